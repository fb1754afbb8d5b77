"""Damaged checkpoints are detected, named, and loading falls back to the previous one."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import hardtrain as ht
from hardtrain.checkpoint._format import checksum, digest_of


def folder(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:08d}"


def truncate(ckpt: Path) -> None:
    path = ckpt / "rank-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def flip_byte(ckpt: Path) -> None:
    path = ckpt / "rank-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete_file(ckpt: Path) -> None:
    os.remove(ckpt / "rank-00000.json")


def delete_manifest(ckpt: Path) -> None:
    os.remove(ckpt / "MANIFEST.json")


def manifest_names_missing_file(ckpt: Path) -> None:
    rewrite_manifest(ckpt, lambda files: files.update(
        {"rank-00000.extra.json": entry_for(b"{}")}
    ))


def garble_manifest(ckpt: Path) -> None:
    path = ckpt / "MANIFEST.json"
    path.write_bytes(path.read_bytes()[:40] + b"\x00garbage")


def entry_for(data: bytes, rank: int = 0) -> dict:
    """A manifest entry that matches ``data``."""
    digest = digest_of(data)
    return {"bytes": len(data), "rank": rank, "xxh3_128": digest.checksum,
            "chunks": list(digest.chunks)}


def rewrite_manifest(ckpt: Path, edit: Callable[[dict], None]) -> None:
    """Edit the file list and re-seal the manifest's own checksum, as a tamperer would."""
    path = ckpt / "MANIFEST.json"
    body = json.loads(path.read_text())
    body.pop("manifest_checksum")
    edit(body["files"])
    body["manifest_checksum"] = checksum(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    path.write_text(json.dumps(body))


DAMAGE = {
    "truncated": (truncate, "rank-00000.safetensors", "wrong size"),
    "flipped byte": (flip_byte, "rank-00000.safetensors", "wrong checksum"),
    "deleted file": (delete_file, "rank-00000.json", "missing"),
    "deleted manifest": (delete_manifest, "MANIFEST.json", "not committed"),
    "manifest names a missing file": (manifest_names_missing_file, "rank-00000.extra.json",
                                      "missing"),
    "garbled manifest": (garble_manifest, "MANIFEST.json", "manifest"),
}


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> ht.CheckpointStore:
    store = ht.CheckpointStore(tmp_path)
    store.save(100, {"w": torch.full((64, 64), 1.0)}, {"step": 100})
    store.save(200, {"w": torch.full((64, 64), 2.0)}, {"step": 200})
    return store


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_detected_named_and_loading_falls_back(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore, kind: str
) -> None:
    damage, bad_file, reason = DAMAGE[kind]
    damage(folder(tmp_path, 200))

    report = two_checkpoints.verify(200)
    assert not report.ok
    assert any(p.file == bad_file and p.reason == reason for p in report.problems), report

    store = ht.CheckpointStore(tmp_path)  # a fresh process resuming
    if kind == "deleted manifest":  # uncommitted: silently absent, nothing to warn about
        loaded = store.load()
    else:
        with pytest.warns(ht.CheckpointFallbackWarning) as warned:
            loaded = store.load()
        message = str(warned[0].message)
        assert "step-00000200" in message and bad_file in message and reason in message
        assert "runbooks/checkpoint-corruption.md" in message
        rejected = [r for r in store.events.records if r["event"] == "checkpoint_rejected"]
        assert [r["step"] for r in rejected] == [200]
        assert bad_file in rejected[0]["reason"]
    assert loaded.step == 100
    assert torch.equal(loaded.tensors["w"], torch.full((64, 64), 1.0))
    assert loaded.state == {"step": 100}


def test_a_rejected_checkpoint_is_never_chosen_again(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore
) -> None:
    flip_byte(folder(tmp_path, 200))
    store = ht.CheckpointStore(tmp_path)
    with pytest.warns(ht.CheckpointFallbackWarning):
        assert store.load().step == 100
    # Repaired behind our back: this run still does not trust it.
    flip_byte(folder(tmp_path, 200))
    assert store.verify(200).ok
    assert store.load().step == 100
    info = store.latest()
    assert info is not None and info.step == 100
    assert len([r for r in store.events.records if r["event"] == "checkpoint_rejected"]) == 1


def test_an_explicit_step_that_fails_raises_instead_of_falling_back(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore
) -> None:
    truncate(folder(tmp_path, 200))
    with pytest.raises(ht.CheckpointCorruptError, match=r"rank-00000\.safetensors: wrong size"):
        two_checkpoints.load(200)


def test_every_checkpoint_damaged_is_a_clear_error_not_a_fresh_start(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore
) -> None:
    flip_byte(folder(tmp_path, 100))
    flip_byte(folder(tmp_path, 200))
    store = ht.CheckpointStore(tmp_path)
    with pytest.warns(ht.CheckpointFallbackWarning), pytest.raises(ht.CheckpointCorruptError) as e:
        store.load()
    assert not isinstance(e.value, ht.NoCheckpointError)  # "start from scratch" must not catch it
    assert "step-00000100" in str(e.value) and "step-00000200" in str(e.value)


BIG = 2 << 20  # float32 elements: 8 MiB, more than one 4 MiB checksum chunk


def flip_last_byte(ckpt: Path) -> None:
    path = ckpt / "rank-00000.safetensors"
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0xFF]))


def test_in_place_load_of_damaged_data_falls_back_without_touching_out_first(
    tmp_path: Path,
) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(100, {"w": torch.full((BIG,), 1.0)})
    store.save(200, {"w": torch.full((BIG,), 2.0)})
    flip_last_byte(folder(tmp_path, 200))
    out = {"w": torch.full((BIG,), -5.0)}
    with pytest.warns(ht.CheckpointFallbackWarning):
        assert ht.CheckpointStore(tmp_path).load(out=out).step == 100
    assert torch.equal(out["w"], torch.full((BIG,), 1.0))


def test_when_nothing_verifies_out_is_untouched(tmp_path: Path) -> None:
    store = ht.CheckpointStore(tmp_path)
    store.save(100, {"w": torch.full((BIG,), 1.0)})
    flip_last_byte(folder(tmp_path, 100))
    out = {"w": torch.full((BIG,), -5.0)}
    with pytest.warns(ht.CheckpointFallbackWarning), pytest.raises(ht.CheckpointCorruptError):
        ht.CheckpointStore(tmp_path).load(out=out)
    assert torch.equal(out["w"], torch.full((BIG,), -5.0))


def test_a_damaged_header_is_a_checksum_problem_and_touches_nothing(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore
) -> None:
    path = folder(tmp_path, 200) / "rank-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[12] ^= 0x20  # inside the JSON header
    path.write_bytes(bytes(data))
    store = ht.CheckpointStore(tmp_path)
    out = {"w": torch.full((64, 64), -5.0)}
    with pytest.raises(ht.CheckpointCorruptError, match="wrong checksum"):
        store.load(200, out=out)
    assert torch.equal(out["w"], torch.full((64, 64), -5.0))


# ------------------------------------------------------------------------ no pickle, ever

SENTINEL: Path | None = None


class Exploit:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.path, "pwned"))


def pickle_bytes(sentinel: Path) -> bytes:
    return pickle.dumps({"w": Exploit(sentinel)})


def torch_save_bytes(sentinel: Path, tmp: Path) -> bytes:
    path = tmp / "exploit.pt"
    torch.save({"w": Exploit(sentinel)}, path)
    assert zipfile.is_zipfile(path)
    return path.read_bytes()


@pytest.mark.parametrize("name", ["model.pt", "optimizer.bin", "state.pkl", "x.ckpt", "data"])
def test_a_planted_pickle_next_to_the_files_is_never_unpickled(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore, name: str
) -> None:
    sentinel = tmp_path / "executed"
    (folder(tmp_path, 200) / name).write_bytes(torch_save_bytes(sentinel, tmp_path))
    store = ht.CheckpointStore(tmp_path)
    assert store.load().step == 200
    report = store.verify(200)
    assert report.ok
    assert f"{name} (pickle: never loaded)" in report.ignored
    assert not sentinel.exists()


@pytest.mark.parametrize("target", ["rank-00000.safetensors", "rank-00000.json"])
def test_a_pickle_in_place_of_a_data_file_is_never_unpickled(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore, target: str
) -> None:
    sentinel = tmp_path / "executed"
    (folder(tmp_path, 200) / target).write_bytes(pickle_bytes(sentinel))
    with pytest.warns(ht.CheckpointFallbackWarning):
        assert ht.CheckpointStore(tmp_path).load().step == 100
    # Even with the manifest re-sealed to match, the bytes are parsed, never unpickled.
    data = (folder(tmp_path, 200) / target).read_bytes()
    rewrite_manifest(folder(tmp_path, 200), lambda files: files[target].update(
        entry_for(data)
    ))
    with pytest.warns(ht.CheckpointFallbackWarning, match="malformed"):
        assert ht.CheckpointStore(tmp_path).load().step == 100
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["model.pt", "weights.pkl", "state.bin"])
def test_a_manifest_naming_a_pickle_is_refused(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore, name: str
) -> None:
    sentinel = tmp_path / "executed"
    ckpt = folder(tmp_path, 200)
    data = torch_save_bytes(sentinel, tmp_path)
    (ckpt / name).write_bytes(data)
    rewrite_manifest(ckpt, lambda files: files.update(
        {name: entry_for(data)}
    ))
    report = ht.CheckpointStore(tmp_path).verify(200)
    assert any("never pickle" in p.detail for p in report.problems), report
    with pytest.warns(ht.CheckpointFallbackWarning, match="never pickle"):
        assert ht.CheckpointStore(tmp_path).load().step == 100
    assert not sentinel.exists()


def test_a_manifest_cannot_point_outside_its_folder(
    tmp_path: Path, two_checkpoints: ht.CheckpointStore
) -> None:
    rewrite_manifest(folder(tmp_path, 200), lambda files: files.update(
        {"../step-00000100/rank-00000.json": entry_for(b"x")}
    ))
    report = ht.CheckpointStore(tmp_path).verify(200)
    assert any("not a plain file name" in p.detail for p in report.problems)
