"""Run tests/trainer/train_script.py, and compare two runs bit for bit: every step's loss
(the last line written for it) and every tensor of the final checkpoint (model, optimizer,
RNG and data state included)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht

SCRIPT = Path(__file__).with_name("train_script.py")
_straight: dict[tuple[str, ...], Path] = {}


def run(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=180, env=env, start_new_session=True,
    )


def straight(tmp_path_factory: pytest.TempPathFactory, settings: tuple[str, ...]) -> Path:
    """The uninterrupted run with these settings (one per session)."""
    if settings not in _straight:
        run_dir = tmp_path_factory.mktemp("straight")
        done = run(run_dir, *settings)
        assert done.returncode == 0, done.stderr
        _straight[settings] = run_dir
    return _straight[settings]


def losses(run_dir: str | os.PathLike[str]) -> dict[int, float]:
    """step -> loss, the last line written for each step (a replayed step is written again)."""
    found: dict[int, float] = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            found[entry["step"]] = entry["loss"]
    return found


def events(run_dir: str | os.PathLike[str], name: str) -> list[dict[str, Any]]:
    """The ``name`` events in run_dir/events.jsonl, in the order they were written."""
    with open(os.path.join(run_dir, "events.jsonl"), encoding="utf-8") as f:
        return [e for e in map(json.loads, f) if e["event"] == name]


def final_state(run_dir: str | os.PathLike[str], rank: int = 0) -> ht.LoadedCheckpoint:
    return ht.CheckpointStore(run_dir).load(rank=rank)


def assert_same_run(a: str | os.PathLike[str], b: str | os.PathLike[str], ranks: int = 1,
                    *, state: bool = True) -> None:
    """state=False: tensors only (the JSON state holds the data position, which differs
    between a stream with batches removed and one that skipped them)."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb), (sorted(la), sorted(lb))
    for step in sorted(la):
        same = la[step] == lb[step] or (math.isnan(la[step]) and math.isnan(lb[step]))
        assert same, f"step {step}: loss {la[step]!r} != {lb[step]!r}"
    for rank in range(ranks):
        sa, sb = final_state(a, rank), final_state(b, rank)
        assert sa.step == sb.step
        assert sorted(sa.tensors) == sorted(sb.tensors)
        for name in sa.tensors:
            assert torch.equal(sa.tensors[name], sb.tensors[name]), f"rank {rank}: {name} differs"
        if state:
            assert _without_volatile(sa.state) == _without_volatile(sb.state)


def _without_volatile(state: dict[str, Any]) -> dict[str, Any]:
    return state
