"""Crash safety: a process saving checkpoints is SIGKILLed at random instants.

After every kill, every committed checkpoint verifies, the newest loads back bit for bit
as it was saved, and uncommitted folders are invisible.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hardtrain as ht

SAVER = Path(__file__).with_name("saver.py")
sys.path.insert(0, str(SAVER.parent))
from saver import expected  # noqa: E402


def kill_at_random(root: Path, num_kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seen = {"uncommitted": 0, "kills_after_progress": 0}
    newest = 0
    for kill in range(num_kills):
        proc = subprocess.Popen(
            [sys.executable, str(SAVER), str(root)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), f"kill {kill}: saver said {line!r}"
        time.sleep(rng.uniform(0.0, 0.25))  # the fault's instant, not a wait for a result
        proc.kill()
        proc.wait()

        store = ht.CheckpointStore(root)
        everything = store.list(include_uncommitted=True)
        committed = [i.step for i in everything if i.committed]
        seen["uncommitted"] += sum(not i.committed for i in everything)
        for step in committed:
            assert store.verify(step).ok, f"kill {kill}: committed step {step} does not verify"
        if not committed:
            continue
        loaded = store.load()
        assert loaded.step == committed[-1]
        tensors, state = expected(loaded.step)
        assert loaded.state == state
        for name, value in tensors.items():
            assert torch.equal(loaded.tensors[name], value), (kill, loaded.step, name)
        seen["kills_after_progress"] += loaded.step > newest
        newest = loaded.step
    return seen


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    seen = kill_at_random(tmp_path, num_kills=20, seed=1)
    assert seen["kills_after_progress"] >= 10  # the kills landed while it was saving


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_at_random_instants_soak(tmp_path: Path) -> None:
    seen = kill_at_random(tmp_path, num_kills=200, seed=2)
    assert seen["kills_after_progress"] >= 100
    assert seen["uncommitted"] > 0  # some kills landed between writing and committing
