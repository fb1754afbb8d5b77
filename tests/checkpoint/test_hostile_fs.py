"""A run directory that others can write (a shared filesystem, a confused colleague):
symlinks are never followed out of it, FIFOs and other special files are never opened,
and cleanup removes only temporary files whose owner is provably gone.

Each case starts from a real run. A sacrificial folder outside the run directory stands
for what a link points to: it must stay intact byte for byte. Where a link points to a
FIFO outside, following it would block: a hang fails the test (pytest-timeout, and a
timeout on every command) instead of hanging the suite.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

import hardtrain as ht
from hardtrain._files import NotRegularFileError
from hardtrain.checkpoint import _storage, _tmpfiles
from hardtrain.checkpoint._format import checksum, digest_of
from hardtrain.checkpoint._tmpfiles import TmpOwner, own_owner, tmp_name

pytestmark = pytest.mark.timeout(120)

HARDTRAIN = shutil.which("hardtrain", path=os.path.dirname(sys.executable))
CLI_TIMEOUT_S = 60  # a hang fails here; each command takes a few seconds


def folder(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def tensors(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(64, dtype=torch.float32) + step}


def make_run(run: Path, steps: range, **kwargs: object) -> ht.CheckpointStore:
    store = ht.CheckpointStore(run, **kwargs)  # type: ignore[arg-type]
    for step in steps:
        store.save(step, tensors(step), {"step": step},
                   files={"run.json": json.dumps({"step": step}).encode()})
    return store


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (not followed): bytes of files, targets of links, kinds
    of the rest. What a hostile link's target must keep."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = "dir"
            elif path.is_file():
                found[key] = path.read_bytes()
            else:
                found[key] = ("special", path.lstat().st_mode)
    return found


def victim_folder(tmp_path: Path) -> Path:
    """Outside the run: files named as a checkpoint's, and one of someone else's."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "rank-00000.json").write_text('{"precious": true}')
    (victim / "rank-00000.safetensors").write_bytes(b"precious tensors")
    (victim / "git-diff.patch").write_text("precious patch\n")
    (victim / "notes.txt").write_text("precious notes\n")
    return victim


def reseal(ckpt: Path, name: str, data: bytes) -> None:
    """Make the manifest's entry for ``name`` match ``data`` and re-seal its own
    checksum, as _format.encode_manifest does: only the symlink rule can catch it."""
    path = ckpt / "MANIFEST.json"
    body = json.loads(path.read_text())
    body.pop("manifest_checksum")
    digest = digest_of(data)
    body["files"][name].update(bytes=digest.num_bytes, xxh3_128=digest.checksum,
                               chunks=list(digest.chunks))
    body["manifest_checksum"] = checksum(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert HARDTRAIN is not None, f"no hardtrain console script next to {sys.executable}"
    result = subprocess.run([HARDTRAIN, *args], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def fallback_message(record: pytest.WarningsRecorder) -> str:
    messages = [str(w.message) for w in record if w.category is ht.CheckpointFallbackWarning]
    assert messages, [str(w.message) for w in record]
    return messages[0]


# ------------------------------------------------------------------ symlinked folders


def test_a_symlinked_step_folder_is_damage_never_loaded_never_deleted_through(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    make_run(run, range(1, 3))
    elsewhere = make_run(tmp_path / "elsewhere", range(3, 4))  # a checkpoint that verifies
    target = folder(tmp_path / "elsewhere", 3)
    before = snapshot(tmp_path / "elsewhere")
    folder(run, 3).symlink_to(target, target_is_directory=True)

    store = ht.CheckpointStore(run, keep_last=1)
    with pytest.warns(ht.CheckpointFallbackWarning) as record:
        loaded = store.load()
    assert loaded.step == 2
    message = fallback_message(record)
    assert "step-00000003" in message and "MANIFEST.json" in message
    assert f"not a folder: symlink to {str(target)!r}" in message

    report = store.verify(3)
    assert not report.ok and "symlink" in str(report)
    listed = {i.step: i for i in store.list(include_uncommitted=True)}
    assert listed[3].problem is not None and "symlink" in listed[3].problem

    ls = cli("ls", str(run))
    assert ls.returncode == 1 and "not a folder: symlink" in ls.stdout, ls
    verify = cli("verify", str(run))
    assert verify.returncode == 1 and "not a folder: symlink" in verify.stdout, verify

    # Retention (keep_last=1) after two more saves: the link is set aside (renamed),
    # its target is never deleted through.
    store.save(4, tensors(4))
    store.save(5, tensors(5))
    assert snapshot(tmp_path / "elsewhere") == before
    assert elsewhere.load().step == 3
    names = sorted(os.listdir(run / "checkpoints"))
    assert names[-1] == "step-00000005" and len([n for n in names if n.startswith("step-")]) == 2
    aside = [run / "checkpoints" / n for n in names if n.startswith("step-00000003.rejected-")]
    assert len(aside) == 1 and aside[0].is_symlink() and aside[0].resolve() == target
    assert [(i.step, i.reason) for i in store.list_set_aside()] == [(3, None)]  # no note
    events = [r for r in store.events.records if r["event"] == "checkpoint_set_aside"]
    assert "symlink" in events[0]["reason"] and "note_error" in events[0]


def test_a_symlinked_step_folder_that_no_load_saw_is_set_aside_by_retention(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    make_run(run, range(1, 3))
    victim = victim_folder(tmp_path)
    before = snapshot(victim)
    shutil.rmtree(folder(run, 1))
    folder(run, 1).symlink_to(victim, target_is_directory=True)  # older than every save
    store = ht.CheckpointStore(run, keep_last=2)
    store.save(3, tensors(3))
    store.save(4, tensors(4))
    assert snapshot(victim) == before
    assert [i.step for i in store.list()] == [3, 4]  # the link never counted as a checkpoint
    assert [i.step for i in store.list_set_aside()] == [1]


def test_a_symlink_in_place_of_the_next_step_is_set_aside_and_the_save_writes_its_own(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    store = make_run(run, range(1, 3), keep_last=1)
    victim = victim_folder(tmp_path)
    before = snapshot(victim)
    folder(run, 3).symlink_to(victim, target_is_directory=True)
    info = store.save(3, tensors(3), {"step": 3})
    assert info.step == 3
    assert folder(run, 3).is_dir() and not folder(run, 3).is_symlink()
    assert snapshot(victim) == before
    assert store.load().step == 3 and torch.equal(store.load().tensors["w"], tensors(3)["w"])
    aside = store.list_set_aside()
    assert [i.step for i in aside] == [3] and Path(aside[0].path).is_symlink()


def test_a_symlink_planted_during_a_save_fails_that_save_and_nothing_is_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    store = make_run(run, range(1, 3), keep_last=1)
    victim = victim_folder(tmp_path)
    before = snapshot(victim)
    real_makedirs = _storage.LocalStorage.makedirs

    def planted(self: _storage.LocalStorage, path: str) -> None:
        if path.endswith("step-00000003"):  # after the way was cleared, before the write
            folder(run, 3).symlink_to(victim, target_is_directory=True)
        real_makedirs(self, path)

    monkeypatch.setattr(_storage.LocalStorage, "makedirs", planted)
    with pytest.raises(ht.CheckpointStorageError,
                       match=r"step-00000003: not a folder: symlink to .*victim"):
        store.save(3, tensors(3))
    monkeypatch.undo()
    assert snapshot(victim) == before
    with pytest.warns(ht.CheckpointFallbackWarning, match="step-00000003.*symlink"):
        assert store.load().step == 2
    store.save(4, tensors(4))  # retention sets the link aside, never deletes through it
    assert snapshot(victim) == before
    assert folder(run, 3).exists() is False and [i.step for i in store.list()] == [4]
    assert [i.step for i in store.list_set_aside()] == [3]


def test_a_symlinked_checkpoints_folder_is_refused_not_taken_for_an_empty_run(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    make_run(tmp_path / "elsewhere", range(1, 3))
    before = snapshot(tmp_path / "elsewhere")
    run.mkdir()
    (run / "checkpoints").symlink_to(tmp_path / "elsewhere" / "checkpoints")
    store = ht.CheckpointStore(run, keep_last=1)
    with pytest.raises(ht.CheckpointError, match="checkpoints: not a folder: symlink"):
        store.load()
    with pytest.raises(ht.CheckpointWriteError, match="checkpoints: not a folder: symlink"):
        store.save(3, tensors(3))
    assert snapshot(tmp_path / "elsewhere") == before


# -------------------------------------------------------------------- symlinked files


@pytest.mark.parametrize("target_kind", ["file", "fifo"])
def test_a_listed_file_that_is_a_symlink_out_is_damage_and_never_read(
    tmp_path: Path, target_kind: str,
) -> None:
    run = tmp_path / "run"
    make_run(run, range(1, 3))
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.json"
    data = b'{"password": "hunter2"}'
    if target_kind == "file":
        secret.write_bytes(data)
    else:
        os.mkfifo(secret)  # following the link to read it would block: the test hangs
    before = snapshot(outside)
    (folder(run, 2) / "run.json").unlink()
    (folder(run, 2) / "run.json").symlink_to(secret)
    reseal(folder(run, 2), "run.json", data)  # the manifest vouches for the bytes

    store = ht.CheckpointStore(run, keep_last=1)
    with pytest.raises(ht.CheckpointCorruptError, match=r"run\.json.*not a regular file: symlink"):
        store.read_file(2, "run.json")
    report = store.verify(2)
    assert [p.file for p in report.problems] == ["run.json"]
    assert f"not a regular file: symlink to {str(secret)!r}" in str(report)
    with pytest.warns(ht.CheckpointFallbackWarning) as record:
        assert store.load().step == 1
    message = fallback_message(record)
    assert "step-00000002" in message and "run.json" in message and "symlink" in message
    verify = cli("verify", str(run), "--step", "2")
    assert verify.returncode == 1 and "not a regular file: symlink" in verify.stdout
    assert "hunter2" not in verify.stdout + verify.stderr

    store.save(3, tensors(3))  # step 2 was rejected: set aside, link and all
    store.save(4, tensors(4))
    assert snapshot(outside) == before
    assert [i.step for i in store.list()] == [4]
    aside = store.list_set_aside()
    assert [i.step for i in aside] == [2] and (Path(aside[0].path) / "run.json").is_symlink()


def test_pruning_a_folder_that_holds_a_symlink_sets_it_aside_and_deletes_nothing_through(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    make_run(run, range(1, 3))
    victim = victim_folder(tmp_path)
    before = snapshot(victim)
    (folder(run, 1) / "rank-00000.json").unlink()
    (folder(run, 1) / "rank-00000.json").symlink_to(victim / "rank-00000.json")
    store = ht.CheckpointStore(run, keep_last=1)  # a new run: nothing was verified
    store.save(3, tensors(3))
    assert snapshot(victim) == before
    assert [i.step for i in store.list()] == [3]
    aside = store.list_set_aside()
    assert [i.step for i in aside] == [1]
    assert aside[0].reason is not None and "rank-00000.json: not a regular file: symlink" \
        in aside[0].reason
    assert (Path(aside[0].path) / "rank-00000.json").is_symlink()


# ---------------------------------------------------------------------------- FIFOs


def test_a_fifo_as_manifest_blocks_nothing_and_loading_falls_back(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, range(1, 4))
    os.remove(folder(run, 3) / "MANIFEST.json")
    os.mkfifo(folder(run, 3) / "MANIFEST.json")
    store = ht.CheckpointStore(run)
    with pytest.warns(ht.CheckpointFallbackWarning) as record:
        assert store.load().step == 2
    message = fallback_message(record)
    assert "step-00000003" in message and "MANIFEST.json" in message
    assert "not a regular file: FIFO" in message
    assert not store.verify(3).ok

    ls = cli("ls", str(run))
    assert ls.returncode == 1, ls
    row = next(line for line in ls.stdout.splitlines() if line.startswith("3 "))
    assert "BAD" in row and "MANIFEST.json" in row and "not a regular file: FIFO" in row
    verify = cli("verify", str(run))
    assert verify.returncode == 1 and "not a regular file: FIFO" in verify.stdout, verify
    assert (folder(run, 3) / "MANIFEST.json").is_fifo()


def test_an_unlisted_fifo_is_listed_as_ignored_and_never_opened(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, range(1, 3))
    os.mkfifo(folder(run, 2) / "model.pt")  # sniffed for a pickle if it were a file
    os.mkfifo(folder(run, 2) / "rank-00007.json")  # named like ours
    store = ht.CheckpointStore(run, keep_last=1)
    report = store.verify(2)
    assert report.ok and {"model.pt", "rank-00007.json"} <= set(report.ignored)
    assert cli("ls", str(run)).returncode == 0
    verify = cli("verify", str(run))
    assert verify.returncode == 0 and "model.pt" in verify.stdout, verify
    folder(run, 3).mkdir()  # as a crashed attempt at step 3 would leave it, but a FIFO
    os.mkfifo(folder(run, 3) / "rank-00003.json")
    store.save(3, tensors(3))  # pruning step 2: its FIFO is neither opened nor deleted
    assert (folder(run, 3) / "rank-00003.json").is_fifo()  # cleanup of 3 left it, and said so
    left = [r for r in store.events.records if r["event"] == "checkpoint_foreign_entries_left"]
    assert [r["step"] for r in left] == [3]
    assert left[0]["entries"] == ["checkpoints/step-00000003/rank-00003.json: not a regular "
                                  "file: FIFO"]
    assert store.verify(3).ok
    aside = store.list_set_aside()
    assert [i.step for i in aside] == [2] and (Path(aside[0].path) / "rank-00007.json").is_fifo()
    assert aside[0].reason is not None and "FIFO" in aside[0].reason


def job(run: Path) -> tuple[ht.HardenedTrainer, Callable[[Any], torch.Tensor]]:
    """A small training job on ``run``, as a restarted script would build it."""
    ht.seed_everything(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=4)
    trainer = ht.HardenedTrainer(
        model, opt, data, run, seed=3,
        checkpoint=ht.CheckpointPolicy(every=None, every_steps=2, async_save=False))

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    return trainer, step_fn


def test_a_resuming_fit_falls_back_past_a_fifo_manifest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer, step_fn = job(run)
    assert trainer.fit(step_fn, max_steps=6).step == 6
    os.remove(folder(run, 6) / "MANIFEST.json")
    os.mkfifo(folder(run, 6) / "MANIFEST.json")
    trainer, step_fn = job(run)
    with pytest.warns(ht.CheckpointFallbackWarning) as record:
        result = trainer.fit(step_fn, max_steps=8)
    assert result.resumed_from == 4 and result.step == 8
    message = fallback_message(record)
    assert "step-00000006" in message and "MANIFEST.json" in message and "FIFO" in message


def test_a_symlinked_lease_is_refused_before_the_first_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("someone else's file\n")
    (run / "lease.json").symlink_to(outside)
    trainer, step_fn = job(run)
    with pytest.raises(ht.CheckpointStorageError,
                       match=r"lease\.json: not a regular file: symlink"):
        trainer.fit(step_fn, max_steps=2)
    assert outside.read_text() == "someone else's file\n"
    assert not (run / "checkpoints").exists()


# --------------------------------------------------------------------------- the logs


def test_symlinked_or_fifo_event_logs_are_never_written_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "events.jsonl").write_text("someone else's log\n")
    before = snapshot(outside)
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").symlink_to(outside / "events.jsonl")
    with caplog.at_level(logging.WARNING, logger="hardtrain.telemetry"):
        store = make_run(run, range(1, 3))
    assert snapshot(outside) == before
    assert any("events.jsonl: not a regular file: symlink" in r.getMessage()
               for r in caplog.records)
    assert [r["event"] for r in store.events.records].count("checkpoint_saved") == 2

    (run / "events.jsonl").unlink()
    os.mkfifo(run / "events.jsonl")
    store.save(3, tensors(3))  # no reader: opening it to write would fail or block
    assert (run / "events.jsonl").is_fifo()


def test_a_symlinked_metrics_log_stops_fit_before_the_first_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.jsonl"
    outside.write_text("someone else's metrics\n")
    (run / "metrics.jsonl").symlink_to(outside)
    trainer, step_fn = job(run)
    with pytest.raises(NotRegularFileError, match=r"metrics\.jsonl: not a regular file: "
                       r"symlink to .*never writes through a link"):
        trainer.fit(step_fn, max_steps=2)
    assert outside.read_text() == "someone else's metrics\n"
    assert not (run / "checkpoints").exists()


# ------------------------------------------------------------------ temporary files


@pytest.fixture
def live_process() -> Iterator[psutil.Process]:
    """A process of this machine that runs for the test."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield psutil.Process(child.pid)
    finally:
        child.kill()
        child.wait()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not psutil.pid_exists(child.pid)
    return child.pid


def owner(pid: int, started: float | None = None, machine: str | None = None) -> TmpOwner:
    me = own_owner(os.getpid())
    return TmpOwner(me.host, machine or me.machine, pid,
                    0 if started is None else round(started * 100))


def test_cleanup_removes_only_temporary_files_whose_owner_is_gone(
    tmp_path: Path, live_process: psutil.Process,
) -> None:
    run = tmp_path / "run"
    make_run(run, range(1, 2))
    crashed = folder(run, 2)
    crashed.mkdir()
    gone = dead_pid()
    init = psutil.Process(1)
    name = "rank-00000.safetensors"
    kept = {
        "another live process": tmp_name(name, owner(live_process.pid, live_process.create_time())),
        "pid 1": tmp_name(name, owner(1, init.create_time())),
        "another machine": tmp_name(name, owner(gone, 1.0, machine="0badf00d")),
        "an older hardtrain's, pid alive": f".{name}.tmp-{live_process.pid}-abcd1234",
        "not a name hardtrain makes": f".{name}.tmp-someone-else",
        "an unknown start": tmp_name(name, owner(live_process.pid)),
        "a wild pid": f".{name}.tmp-{10**40}-abcd1234",
    }
    removed = {
        "a dead process": tmp_name(name, owner(gone, 1.0)),
        "an earlier process under this pid": tmp_name(name, owner(os.getpid(), 1.0)),
        "a reused pid": tmp_name(name, owner(live_process.pid, live_process.create_time() - 60)),
        "this process, not writing": tmp_name(name),
        "an older hardtrain's, pid gone": f".{name}.tmp-{gone}-abcd1234",
    }
    for tmp in [*kept.values(), *removed.values()]:
        (crashed / tmp).write_bytes(b"partial")
    store = ht.CheckpointStore(run)
    store.save(2, tensors(2))  # cleanup after the commit of step 2
    left = set(os.listdir(crashed))
    assert {why: tmp in left for why, tmp in kept.items()} == dict.fromkeys(kept, True)
    assert {why: tmp in left for why, tmp in removed.items()} == dict.fromkeys(removed, False)


def test_this_process_keeps_the_temporary_files_it_is_writing(tmp_path: Path) -> None:
    tmp = tmp_name("rank-00000.json")
    _tmpfiles.WRITING.add(tmp)
    try:
        assert not _tmpfiles.removable(tmp)
    finally:
        _tmpfiles.WRITING.discard(tmp)
    assert _tmpfiles.removable(tmp)


def test_temporary_names_say_who_writes_them(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str, **kwargs: object) -> None:
        seen.append(src)
        real_replace(src, dst, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", spy)
        store.save(1, tensors(1))
    me = own_owner(os.getpid())
    prefix = f".rank-00000.safetensors.tmp-{me.host}-{me.machine}-{os.getpid()}-{me.started}-"
    assert any(name.startswith(prefix) for name in seen), seen
