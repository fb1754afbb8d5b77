"""Compare two runs bit for bit: every step's loss (the last line written for it) and every
tensor of the final checkpoint (model, optimizer, RNG and data state included)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

import hardtrain as ht


def losses(run_dir: str | os.PathLike[str]) -> dict[int, float]:
    """step -> loss, the last line written for each step (a replayed step is written again)."""
    found: dict[int, float] = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            found[entry["step"]] = entry["loss"]
    return found


def final_state(run_dir: str | os.PathLike[str], rank: int = 0) -> ht.LoadedCheckpoint:
    return ht.CheckpointStore(run_dir).load(rank=rank)


def assert_same_run(a: str | os.PathLike[str], b: str | os.PathLike[str], ranks: int = 1) -> None:
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
        assert _without_volatile(sa.state) == _without_volatile(sb.state)


def _without_volatile(state: dict[str, Any]) -> dict[str, Any]:
    return state
