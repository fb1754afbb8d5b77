"""CheckpointStore on a local filesystem: round trips, async, retention, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import hardtrain as ht


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layer.0.bias": torch.randn(16, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=g).to(torch.float16),
        "double": torch.randn(7, generator=g, dtype=torch.float64),
        "counter": torch.tensor(seed, dtype=torch.int64),  # 0-dim
        "empty": torch.empty(0, 4),
        "mask": torch.rand(9, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "u16": torch.randint(0, 60000, (5,), generator=g, dtype=torch.int32).to(torch.uint16),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(raw_bytes(a[name]), raw_bytes(b[name])), name


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN == NaN and -0.0 != 0.0: bit-exact, not numeric."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def folder(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:08d}"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_round_trip_is_bit_exact(tmp_path: Path, mode: str) -> None:
    store = ht.CheckpointStore(tmp_path)
    tensors = sample_tensors()
    state = {"lr": 0.1, "nan_seen": float("nan"), "name": "x", "nested": {"a": [1, 2.5, None]}}
    if mode == "sync":
        info = store.save(12, tensors, state)
        assert info.step == 12 and info.committed
    else:
        store.save_async(12, tensors, state)
        store.wait()
    loaded = store.load()
    assert loaded.step == 12
    assert_same(loaded.tensors, {k: v.contiguous() for k, v in tensors.items()})
    assert json.dumps(loaded.state, sort_keys=True) == json.dumps(state, sort_keys=True)
    store.close()


def test_files_are_plain_safetensors_and_json(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    tensors = sample_tensors()
    store.save(3, tensors, {"k": 1})
    ckpt = folder(tmp_path, 3)
    expected = ["MANIFEST.json", "rank-00000.json", "rank-00000.safetensors"]
    assert sorted(os.listdir(ckpt)) == expected
    by_library = safetensors.torch.load_file(ckpt / "rank-00000.safetensors")
    assert_same(by_library, {k: v.contiguous() for k, v in tensors.items()})
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1
    for name, entry in manifest["files"].items():
        assert (ckpt / name).stat().st_size == entry["bytes"]


def test_reads_files_written_by_the_safetensors_library(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"a": torch.ones(2)}, {})
    tensors = {k: v.contiguous() for k, v in sample_tensors(5).items()}
    path = folder(tmp_path, 1) / "rank-00000.safetensors"
    safetensors.torch.save_file(tensors, path)
    # Re-commit by hand: what matters is that our parser reads the library's layout.
    from hardtrain.checkpoint._format import FileEntry, digest_of, encode_manifest

    data = path.read_bytes()
    state = (folder(tmp_path, 1) / "rank-00000.json").read_bytes()
    (folder(tmp_path, 1) / "MANIFEST.json").write_bytes(encode_manifest(1, 1, [
        FileEntry("rank-00000.safetensors", 0, digest_of(data)),
        FileEntry("rank-00000.json", 0, digest_of(state)),
    ]))
    assert_same(store.load(1).tensors, tensors)


def test_load_in_place_fills_the_given_tensors(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    model = torch.nn.Linear(4, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    store.save(1, saved)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    params = dict(model.named_parameters())
    loaded = store.load(out=params)
    for name, p in params.items():
        assert torch.equal(p, saved[name])
        assert loaded.tensors[name] is p


def test_load_in_place_mismatch_names_the_difference_and_touches_nothing(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2, 3), "b": torch.ones(3)})
    out = {"w": torch.zeros(3, 2), "extra": torch.zeros(1)}
    with pytest.raises(ht.CheckpointMismatchError) as e:
        store.load(out=out)
    message = str(e.value)
    assert "missing in checkpoint: extra" in message
    assert "not in out=: b" in message
    assert "w: checkpoint has torch.float32 [2, 3], out= has torch.float32 [3, 2]" in message
    assert torch.equal(out["w"], torch.zeros(3, 2))


def test_async_staging_buffer_is_reused_and_caller_may_mutate(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    w = torch.zeros(1000)
    store.save_async(1, {"w": w})
    buffer = store._staging._buffer
    w.fill_(7.0)  # after save_async returned: must not leak into step 1
    store.save_async(2, {"w": w})
    assert store._staging._buffer is buffer
    store.wait()
    assert torch.equal(store.load(1).tensors["w"], torch.zeros(1000))
    assert torch.equal(store.load(2).tensors["w"], torch.full((1000,), 7.0))


def test_background_failure_is_raised_on_the_next_call(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2)})
    blocker = folder(tmp_path, 2) / "rank-00000.safetensors"
    blocker.mkdir(parents=True)  # the rename onto it fails in the background thread
    store.save_async(2, {"w": torch.ones(2)})
    with pytest.raises(ht.CheckpointWriteError, match="nothing was committed"):
        store.list()
    assert [i.step for i in store.list()] == [1]
    store.save_async(3, {"w": torch.full((2,), 3.0)})
    store.wait()
    assert store.load().step == 3


def test_wait_raises_the_background_failure(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    (folder(tmp_path, 5) / "rank-00000.json").mkdir(parents=True)
    store.save_async(5, {"w": torch.ones(2)})
    with pytest.raises(ht.CheckpointWriteError, match="step-00000005"):
        store.wait()


def test_fsync_error_aborts_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(4)}, {"v": 1})
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ht.CheckpointWriteError, match="Input/output error"):
        store.save(2, {"w": torch.zeros(4)}, {"v": 2})
    monkeypatch.undo()
    assert not (folder(tmp_path, 2) / "MANIFEST.json").exists()
    assert [i.step for i in store.list()] == [1]
    loaded = store.load()
    assert loaded.step == 1 and torch.equal(loaded.tensors["w"], torch.ones(4))
    leftovers = [n for n in os.listdir(folder(tmp_path, 2)) if ".tmp-" in n]
    assert leftovers == []


def test_uncommitted_folder_is_invisible(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2)})
    store.save(2, {"w": torch.full((2,), 2.0)})
    os.remove(folder(tmp_path, 2) / "MANIFEST.json")  # as if killed before the commit
    assert [i.step for i in store.list()] == [1]
    assert [i.committed for i in store.list(include_uncommitted=True)] == [True, False]
    assert store.load().step == 1
    assert store.latest() is not None and store.latest().step == 1  # type: ignore[union-attr]


def test_saving_a_committed_step_again_is_refused(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(4, {"w": torch.ones(2)})
    with pytest.raises(ht.CheckpointError, match="already committed"):
        store.save(4, {"w": torch.zeros(2)})
    assert torch.equal(store.load(4).tensors["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"betas": (0.9, 0.99)}, "state['betas'] is a tuple"),
        ({1: "x"}, "has key 1"),
        ({"t": torch.ones(1)}, "state['t'] is a Tensor"),
    ],
)
def test_state_that_would_not_load_back_equal_is_refused(
    tmp_path: Path, state: dict, where: str
) -> None:
    store = ht.CheckpointStore(tmp_path)
    with pytest.raises(TypeError, match=where.replace("[", r"\[").replace("]", r"\]")):
        store.save(1, {}, state)
    assert store.list() == []


def test_bad_arguments_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last=0"):
        ht.CheckpointStore(tmp_path, keep_last=0)
    store = ht.CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="step=-1"):
        store.save(-1, {})
    with pytest.raises(TypeError, match="tensors\\['x'\\] is a list"):
        store.save(1, {"x": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="sparse"):
        store.save(1, {"s": torch.eye(2).to_sparse()})
    with pytest.raises(ht.NoCheckpointError, match="there is none"):
        store.load()


def test_retention_keeps_the_newest_and_only_prunes_after_commit(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path, keep_last=2)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("user file")
    for step in range(1, 6):
        store.save_async(step, {"w": torch.full((3,), float(step))})
    store.wait()
    assert [i.step for i in store.list()] == [4, 5]
    assert (tmp_path / "checkpoints" / "notes.txt").read_text() == "user file"
    pruned = [r["step"] for r in store.events.records if r["event"] == "checkpoint_pruned"]
    assert pruned == [1, 2, 3]


def test_retention_does_not_count_rejected_checkpoints(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path, keep_last=2)
    store.save(1, {"w": torch.ones(3)})
    store.save(2, {"w": torch.ones(3)})
    (folder(tmp_path, 2) / "rank-00000.safetensors").write_bytes(b"garbage")
    with pytest.warns(ht.CheckpointFallbackWarning):
        assert store.load().step == 1
    store.save(3, {"w": torch.ones(3)})
    # keep_last=2 keeps step 3 and the newest good older one (1), not the damaged 2,
    # which is set aside with a note saying why, never deleted.
    assert [i.step for i in store.list()] == [1, 3]
    [aside] = store.list_set_aside()
    assert aside.step == 2 and aside.path.startswith(f"{tmp_path}/checkpoints/step-00000002.")
    assert aside.reason is not None and "rank-00000.safetensors" in aside.reason
    assert aside.set_aside is not None
    assert (Path(aside.path) / "rank-00000.safetensors").read_bytes() == b"garbage"
    [event] = [r for r in store.events.records if r["event"] == "checkpoint_set_aside"]
    assert event["step"] == 2 and event["reason"] == aside.reason
    assert not [r for r in store.events.records if r["event"] == "checkpoint_pruned"]
    for step in (4, 5):  # later prunes pass the set-aside folder by
        store.save(step, {"w": torch.ones(3)})
    assert [i.step for i in store.list()] == [4, 5]
    assert store.list_set_aside() == [aside]


def test_set_aside_folders_without_a_readable_note_are_listed_without_a_reason(
    tmp_path: Path,
) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(3)})
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-00000007.rejected-20261127T045111-49136d").mkdir()  # older hardtrain
    hostile = checkpoints / "step-00000003.rejected-x"
    hostile.mkdir()
    (hostile / "SET-ASIDE.json").write_text('{"reason": ["not", "text"], "set_aside": 1}')
    (checkpoints / "step-00000009.rejectedx").mkdir()  # not a set-aside name
    infos = store.list_set_aside()
    assert [(i.step, i.reason, i.set_aside) for i in infos] == [(3, None, None), (7, None, None)]


def test_stale_files_of_a_crashed_save_are_cleaned_but_nothing_else(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path, keep_last=1)
    crashed = folder(tmp_path, 1)
    crashed.mkdir(parents=True)
    (crashed / ".rank-00000.safetensors.tmp-99999-abcd").write_bytes(b"partial")
    (crashed / "rank-00000.json").write_text("{}")
    (crashed / "my-notes.txt").write_text("keep me")
    store.save(2, {"w": torch.ones(1)})
    assert sorted(os.listdir(crashed)) == ["my-notes.txt"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_extra_files_are_committed_verified_and_read_back(tmp_path: Path, mode: str) -> None:
    store = ht.CheckpointStore(tmp_path)
    files = {"run.json": b'{"a": 1}\n', "git-diff.patch": b"diff --git a/x b/x\n"}
    if mode == "sync":
        store.save(1, {"w": torch.ones(2)}, files=files)
    else:
        store.save_async(1, {"w": torch.ones(2)}, files=files)
        store.wait()
    assert store.read_file(1, "run.json") == files["run.json"]
    assert store.read_file(1, "git-diff.patch") == files["git-diff.patch"]
    assert store.verify(1).ok
    (folder(tmp_path, 1) / "git-diff.patch").write_bytes(b"diff --git a/y b/y\n")  # same size
    with pytest.raises(ht.CheckpointCorruptError, match=r"git-diff\.patch"):
        store.read_file(1, "git-diff.patch")
    assert not store.verify(1).ok
    with pytest.raises(FileNotFoundError, match=r"holds no other\.json"):
        store.read_file(1, "other.json")
    with pytest.raises(ht.NoCheckpointError):
        store.read_file(2, "run.json")


@pytest.mark.parametrize("name", ["rank-00001.json", "MANIFEST.json", "../x.json", "a.pt",
                                  "notes.txt", ".hidden.json"])
def test_extra_file_names_a_checkpoint_cannot_hold(tmp_path: Path, name: str) -> None:
    store = ht.CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="is not a name a checkpoint can hold"):
        store.save(1, {"w": torch.ones(1)}, files={name: b"x"})
    with pytest.raises(TypeError, match="expected bytes"):
        store.save(1, {"w": torch.ones(1)}, files={"run.json": "text"})  # type: ignore[dict-item]
    assert not (tmp_path / "checkpoints").exists() or not store.list()


def test_extra_files_of_a_crashed_save_do_not_linger(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path, keep_last=1)
    store.save(1, {"w": torch.ones(1)}, files={"run.json": b"{}", "git-diff.patch": b"d\n"})
    (folder(tmp_path, 1) / "MANIFEST.json").unlink()  # a crash before the commit
    store.save(1, {"w": torch.ones(1)}, files={"run.json": b"{}"})  # the tree is clean now
    assert sorted(os.listdir(folder(tmp_path, 1))) == ["MANIFEST.json", "rank-00000.json",
                                                     "rank-00000.safetensors", "run.json"]
    assert store.verify(1).ignored == ()
    crashed = folder(tmp_path, 2)
    crashed.mkdir()
    (crashed / "run.json").write_text("{}")
    (crashed / "git-diff.patch").write_text("d\n")
    store.save(3, {"w": torch.ones(1)})
    assert not crashed.exists() and not folder(tmp_path, 1).exists()


def test_events_go_to_events_jsonl(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save_async(1, {"w": torch.ones(1000)})
    store.wait()
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    saved = [e for e in lines if e["event"] == "checkpoint_saved"]
    assert len(saved) == 1
    assert saved[0]["step"] == 1 and saved[0]["rank"] == 0
    assert saved[0]["bytes"] > 4000 and saved[0]["blocking_s"] >= 0 and saved[0]["persist_s"] > 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_tied_weights_save_and_load_back_equal(tmp_path: Path, mode: str) -> None:
    store = ht.CheckpointStore(tmp_path)
    embedding = torch.randn(10, 4)
    tensors = {"embed.weight": embedding, "lm_head.weight": embedding, "row": embedding[2]}
    if mode == "sync":
        store.save(1, tensors)
    else:
        store.save_async(1, tensors)
    loaded = store.load(1).tensors
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name


def test_large_files_are_verified_chunk_by_chunk(tmp_path: Path) -> None:
    from hardtrain.checkpoint._format import CHUNK_BYTES

    store = ht.CheckpointStore(tmp_path)
    big = torch.arange(CHUNK_BYTES * 3 // 8, dtype=torch.float32)  # 1.5 chunks
    store.save(1, {"big": big})
    manifest = json.loads((folder(tmp_path, 1) / "MANIFEST.json").read_text())
    entry = manifest["files"]["rank-00000.safetensors"]
    assert len(entry["chunks"]) == 2 == -(-entry["bytes"] // CHUNK_BYTES)
    import xxhash

    data = (folder(tmp_path, 1) / "rank-00000.safetensors").read_bytes()
    assert entry["xxh3_128"] == xxhash.xxh3_128_hexdigest(data)  # what xxh128sum prints
    path = folder(tmp_path, 1) / "rank-00000.safetensors"
    damaged = bytearray(data)
    damaged[CHUNK_BYTES + 5] ^= 0x10  # in the second chunk
    path.write_bytes(bytes(damaged))
    (problem,) = store.verify(1).problems
    assert problem.reason == "wrong checksum"
    assert f"bytes {CHUNK_BYTES}..{len(data)}" in problem.detail


def test_a_file_url_root_keeps_events_in_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = ht.CheckpointStore(f"file://{tmp_path}/run")
    store.save(1, {"w": torch.ones(1)})
    assert (tmp_path / "run" / "events.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_checksums_do_not_depend_on_how_the_bytes_are_fed() -> None:
    import random

    import xxhash

    from hardtrain.checkpoint._format import CHUNK_BYTES, Hasher, digest_of

    data = bytes(random.Random(0).randbytes(2 * CHUNK_BYTES + 12345))
    rng = random.Random(1)
    hasher = Hasher()
    offset = 0
    while offset < len(data):
        size = rng.choice([1, 7, 4096, CHUNK_BYTES - 3, CHUNK_BYTES, 3 * CHUNK_BYTES])
        hasher.update(data[offset : offset + size])
        offset += size
    expected = digest_of(data)
    assert hasher.digest() == expected
    assert expected.checksum == xxhash.xxh3_128_hexdigest(data)
    assert expected.chunks == tuple(
        xxhash.xxh3_128_hexdigest(data[i : i + CHUNK_BYTES])
        for i in range(0, len(data), CHUNK_BYTES)
    )


def test_results_read_naturally(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2)}, {"lr": 0.5})
    tensors, state = store.load()
    assert torch.equal(tensors["w"], torch.ones(2)) and state == {"lr": 0.5}
    assert store.verify(1)
    (folder(tmp_path, 1) / "rank-00000.json").write_text("{}")
    assert not store.verify(1)


def test_an_interrupted_wait_leaves_the_save_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal
    import threading

    from hardtrain.checkpoint import _storage

    release = threading.Event()
    real_write = _storage.LocalStorage.write_tensors

    def blocked_write(*args: Any) -> Any:
        release.wait(timeout=60)
        return real_write(*args)

    monkeypatch.setattr(_storage.LocalStorage, "write_tensors", blocked_write)
    store = ht.CheckpointStore(tmp_path)
    w = torch.zeros(100)
    store.save_async(1, {"w": w})

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            store.wait()  # blocked on the save: the alarm interrupts it
    finally:
        signal.signal(signal.SIGALRM, previous)
    w.fill_(1.0)
    release.set()
    store.save_async(2, {"w": w})  # must wait for step 1, not overwrite its staging buffer
    store.wait()
    assert torch.equal(store.load(1).tensors["w"], torch.zeros(100))
    assert torch.equal(store.load(2).tensors["w"], torch.ones(100))


def test_a_damaged_checkpoint_is_set_aside_when_its_step_is_saved_again(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    for step in (100, 200, 300):
        store.save(step, {"w": torch.full((3,), float(step))})
    (folder(tmp_path, 300) / "rank-00000.json").write_text('{"x": 1}')
    with pytest.warns(ht.CheckpointFallbackWarning):
        assert store.load().step == 200
    store.save(300, {"w": torch.full((3,), 301.0)})  # replayed after the fallback
    assert torch.equal(store.load().tensors["w"], torch.full((3,), 301.0))
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".rejected-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("step-00000300.rejected-")
    assert (tmp_path / "checkpoints" / aside[0] / "rank-00000.json").read_text() == '{"x": 1}'
    events = [r for r in store.events.records if r["event"] == "checkpoint_set_aside"]
    assert [e["step"] for e in events] == [300]
    # A fresh process that never loaded it finds the damage by verifying before replacing.
    (folder(tmp_path, 300) / "rank-00000.json").write_text('{"y": 2}')
    ht.CheckpointStore(tmp_path).save(300, {"w": torch.full((3,), 302.0)})
    assert torch.equal(store.load(300).tensors["w"], torch.full((3,), 302.0))


def test_a_failed_fsync_after_the_manifest_rename_uncommits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2)})
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(os.fstat(fd).st_mode) and os.path.exists(f"{path}/MANIFEST.json") \
                and path.endswith("step-00000002"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(ht.CheckpointWriteError, match="not committed"):
        store.save(2, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert not (folder(tmp_path, 2) / "MANIFEST.json").exists()
    assert store.load().step == 1
    failed = [r for r in store.events.records if r["event"] == "checkpoint_save_failed"]
    assert [r["step"] for r in failed] == [2]


def test_an_unwritable_events_file_never_fails_a_save(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").mkdir(parents=True)  # appending to it fails
    store = ht.CheckpointStore(tmp_path, keep_last=1)
    store.save(1, {"w": torch.ones(2)})
    store.save_async(2, {"w": torch.ones(2)})
    assert store.wait() is not None
    assert [i.step for i in store.list()] == [2]
    assert [r["event"] for r in store.events.records].count("checkpoint_saved") == 2


def test_load_of_a_step_that_was_never_committed(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2)})
    with pytest.raises(ht.NoCheckpointError, match="for step 5"):
        store.load(5)


def test_reading_another_ranks_files_from_one_process(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2)})
    assert torch.equal(store.load(1, rank=0).tensors["w"], torch.ones(2))
    with pytest.raises(ht.CheckpointMismatchError, match=r"has ranks 0\.\.0, not rank 3"):
        store.load(1, rank=3)


def test_tensor_files_are_plain_safetensors(tmp_path: Path) -> None:
    """hardtrain writes the tensors file itself (in pieces, so that an abandoned save stops
    mid-file); the safetensors library reads it back, every dtype bit for bit."""
    tensors = sample_tensors()
    ht.CheckpointStore(tmp_path).save(1, tensors)
    loaded = safetensors.torch.load_file(folder(tmp_path, 1) / "rank-00000.safetensors")
    assert_same(loaded, tensors)


def test_a_tensor_write_stops_between_pieces_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hardtrain.checkpoint import _storage

    monkeypatch.setattr(_storage, "_WRITE_PIECE", 1000)
    storage = _storage.LocalStorage(str(tmp_path))
    tensors = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}
    calls: list[int] = []
    storage.write_tensors("all.safetensors", tensors, lambda: calls.append(1))
    assert len(calls) == 4 + 1  # 4000 bytes in pieces of 1000, then the 40 bytes of "b"
    assert_same(safetensors.torch.load_file(tmp_path / "all.safetensors"), tensors)

    class Stop(Exception):
        pass

    def stop_at_third() -> None:
        calls.append(1)
        if len(calls) == 5 + 3:
            raise Stop

    with pytest.raises(Stop):
        storage.write_tensors("cut.safetensors", tensors, stop_at_third)
    assert sorted(os.listdir(tmp_path)) == ["all.safetensors"]  # no temporary file left
