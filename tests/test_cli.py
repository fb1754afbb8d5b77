"""The ``hardtrain`` command: the installed console script on local run folders, and
``hardtrain.cli.main`` in-process for ``memory://`` URLs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

import hardtrain.cli
from hardtrain import CheckpointStore

HARDTRAIN = shutil.which("hardtrain", path=os.path.dirname(sys.executable))

# STEP  CREATED (UTC)  SIZE  STATE, as `hardtrain ls` prints it.
ROW = re.compile(
    r"^(?P<step>\d+)\s+"
    r"(?P<created>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}|-)\s+"
    r"(?P<size>\d+ B|\d+\.\d (?:KiB|MiB|GiB)|-)\s+"
    r"(?P<state>\S.*)$"
)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert HARDTRAIN is not None, f"no hardtrain console script next to {sys.executable}"
    result = subprocess.run(
        [HARDTRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def tensors(step: int, numel: int) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(numel, dtype=torch.float32) + step, "step": torch.tensor(step)}


def human(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    return f"{num_bytes / 1024:.1f} KiB"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: what the CLI must not change."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def save_run(root: Path | str) -> CheckpointStore:
    """Steps 1 (tiny: bytes), 2 and 3 (KiB) committed."""
    store = CheckpointStore(root)
    for step, numel in ((1, 4), (2, 1000), (3, 3000)):
        store.save(step, tensors(step, numel), {"step": step})
    return store


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[-5:]
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def folder(run: Path | str, step: int) -> str:
    return f"{run}/checkpoints/step-{step:08d}"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three committed steps and the leftovers of a save that died before its manifest."""
    run = tmp_path_factory.mktemp("good") / "run"
    save_run(run)
    dead = run / "checkpoints" / "step-00000004"
    dead.mkdir()
    (dead / "rank-00000.safetensors").write_bytes(b"half a file")
    return run


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Step 1 intact, step 2's tensors truncated, step 3's state with one byte flipped."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    save_run(run)
    damage(run / "checkpoints" / "step-00000002" / "rank-00000.safetensors", "truncate")
    damage(run / "checkpoints" / "step-00000003" / "rank-00000.json", "flip")
    return run


# ------------------------------------------------------------------- the console script


def test_ls_prints_a_table(good_run: Path, tmp_path: Path) -> None:
    before = tree(good_run)
    result = run_cli("ls", str(good_run), cwd=tmp_path)
    assert result.returncode == 0, result
    assert result.stderr == ""
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["STEP", "CREATED", "(UTC)", "SIZE", "STATE"]
    rows = []
    for line in lines:
        match = ROW.match(line)
        assert match, line
        rows.append(match.groupdict())
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]  # oldest first

    infos = CheckpointStore(good_run).list()
    for row, info in zip(rows, infos, strict=False):
        assert info.created is not None and info.num_bytes is not None
        assert row["created"] == info.created.strftime("%Y-%m-%d %H:%M:%S")
        assert row["size"] == human(info.num_bytes)
        assert row["state"] == "verified"
    assert rows[0]["size"].endswith(" B") and rows[2]["size"].endswith(" KiB")
    assert rows[3] == {"step": "4", "created": "-", "size": "-", "state": "uncommitted (ignored)"}
    assert tree(good_run) == before  # the CLI only looks


def test_verify_exits_0_when_all_verify(good_run: Path, tmp_path: Path) -> None:
    result = run_cli("verify", str(good_run), cwd=tmp_path)
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        f"{folder(good_run, 1)}: ok",
        f"{folder(good_run, 2)}: ok",
        f"{folder(good_run, 3)}: ok",
        "all 3 checkpoint(s) verified",
    ]


def test_verify_names_folder_file_and_reason(damaged_run: Path, tmp_path: Path) -> None:
    result = run_cli("verify", str(damaged_run), cwd=tmp_path)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert lines[0] == f"{folder(damaged_run, 1)}: ok"
    assert lines[1] == f"{folder(damaged_run, 2)}: FAILED"
    assert lines[2].startswith("  rank-00000.safetensors: wrong size (")
    assert "truncated?" in lines[2]
    assert lines[3] == f"{folder(damaged_run, 3)}: FAILED"
    assert lines[4].startswith("  rank-00000.json: wrong checksum (")
    assert lines[5].startswith("2 of 3 checkpoint(s) failed")
    assert len(lines) == 6


def test_verify_step_checks_only_that_step(damaged_run: Path, tmp_path: Path) -> None:
    result = run_cli("verify", str(damaged_run), "--step", "1", cwd=tmp_path)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        f"{folder(damaged_run, 1)}: ok",
        "all 1 checkpoint(s) verified",
    ]


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_nothing_to_look_at_is_one_line_and_exit_2(kind: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    if kind == "empty":
        run.mkdir()
    result = run_cli("verify", str(run), cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardtrain:"), result.stderr
    assert str(run) in lines[0]
    # Nothing was created by looking.
    assert (list(run.iterdir()) == []) if kind == "empty" else not run.exists()


# ------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_ls_nothing_to_look_at(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    if kind == "empty":
        (run / "checkpoints").mkdir(parents=True)
    assert hardtrain.cli.main(["ls", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardtrain:")


def test_ls_marks_damaged_checkpoints(
    damaged_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hardtrain.cli.main(["ls", str(damaged_run)]) == 1
    captured = capsys.readouterr()
    rows = [ROW.match(line) for line in captured.out.splitlines()[1:]]
    states = [m.group("state") if m else None for m in rows]
    assert states[0] == "verified"
    assert states[1] is not None and states[1].startswith("BAD: rank-00000.safetensors: wrong size")
    assert states[2] is not None and states[2].startswith("BAD: rank-00000.json: wrong checksum")
    assert captured.err.startswith("2 damaged checkpoint(s)")


def test_ls_shows_set_aside_folders_with_their_reason(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = save_run(run)
    store.set_aside_after(2, "rolled back from step 3 to 2 \x1b[2Jafter 3 skipped steps")
    (run / "checkpoints" / "step-00000005.rejected-20261127T045111-49136d").mkdir()  # no note
    result = run_cli("ls", str(run), cwd=tmp_path)
    assert result.returncode == 0, result  # set aside is not damage: loading passes it by
    rows = [m.groupdict() for m in map(ROW.match, result.stdout.splitlines()[1:]) if m]
    assert [r["step"] for r in rows] == ["1", "2", "3", "5"]  # by step, set aside or not
    assert [(r["created"], r["size"]) for r in rows[2:]] == [("-", "-"), ("-", "-")]
    [aside] = CheckpointStore(run).list_set_aside()[:1]
    assert rows[2]["state"] == (
        f"set aside {aside.set_aside:%Y-%m-%d %H:%M:%S} (ignored): rolled back from step 3 "
        f"to 2 \\x1b[2Jafter 3 skipped steps [{Path(aside.path).name}]")  # escaped, not drawn
    assert rows[3]["state"] == ("set aside (ignored): no note with the reason; see "
                                "events.jsonl [step-00000005.rejected-20261127T045111-49136d]")


def test_verify_one_damaged_step(damaged_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hardtrain.cli.main(["verify", str(damaged_run), "--step", "3"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{folder(damaged_run, 3)}: FAILED"
    assert lines[1].startswith("  rank-00000.json: wrong checksum (")
    assert lines[2].startswith("1 of 1 checkpoint(s) failed")
    assert "step-00000002" not in "\n".join(lines)


@pytest.fixture
def memory_url() -> Iterator[str]:
    top = f"hardtrain-cli-tests-{uuid.uuid4().hex}"
    yield f"memory://{top}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{top}"):
        fs.rm(f"/{top}", recursive=True)


def test_memory_url(memory_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    save_run(memory_url)

    assert hardtrain.cli.main(["ls", memory_url]) == 0
    rows = [ROW.match(line) for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(m.group("step"), m.group("state")) for m in rows if m] == [
        ("1", "verified"), ("2", "verified"), ("3", "verified"),
    ]
    assert hardtrain.cli.main(["ls", "--no-verify", memory_url]) == 0
    rows = [ROW.match(line) for line in capsys.readouterr().out.splitlines()[1:]]
    assert [m.group("state") for m in rows if m] == ["committed"] * 3

    assert hardtrain.cli.main(["verify", memory_url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "all 3 checkpoint(s) verified"

    fs = fsspec.filesystem("memory")
    path = fsspec.core.url_to_fs(memory_url)[1] + "/checkpoints/step-00000002/rank-00000.json"
    data = bytearray(fs.cat_file(path))
    data[0] ^= 0x01
    fs.pipe_file(path, bytes(data))
    assert hardtrain.cli.main(["verify", memory_url]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"{folder(memory_url, 2)}: FAILED" in out
    assert any(line.startswith("  rank-00000.json: wrong checksum (") for line in out)
    assert out[-1].startswith("1 of 3 checkpoint(s) failed")


def test_memory_url_missing(memory_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert hardtrain.cli.main(["verify", memory_url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hardtrain: {memory_url}")


def test_verify_a_step_that_does_not_exist(
    good_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hardtrain.cli.main(["verify", str(good_run), "--step", "77"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"hardtrain: {good_run}: no checkpoint folder for step 77"
    )
