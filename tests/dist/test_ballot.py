"""The ballot with two real processes (gloo): one all-reduce gives each slot's maximum,
a ``minimum`` slot's minimum, and the same verdict on both ranks; ``_dist.groups``
hands out one group per role and a rebuild makes new ones."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.timeout(120)


def worker(rank: int, rendezvous: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from hardtrain import _dist
    from hardtrain._loop.ballot import Ballot
    from hardtrain._loop.protocol import Effect, Feature, Slot, StepReport

    class Votes(Feature):
        name = "votes"
        slots = (Slot("bad", Effect.SKIP), Slot("signal", Effect.STOP),
                 Slot("due", Effect.SAVE), Slot("free_gib", Effect.VALUE, minimum=True),
                 Slot("worst_ms", Effect.VALUE))

        def vote(self, report: StepReport | None) -> Sequence[int]:
            # rank 0: healthy, no signal, not due, 40 GiB free, 12 ms; rank 1 the rest
            return (0, 0, 0, 40, 12) if rank == 0 else (1, 15, 1, 25, 9)

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=2)
    control = _dist.groups.get(_dist.CONTROL)
    assert _dist.groups.get(_dist.CONTROL) is control  # handed out, not made again
    verdict = Ballot([Votes()], control).cast(None)
    _dist.groups.rebuild()
    rebuilt = _dist.groups.get(_dist.CONTROL)
    again = Ballot([Votes()], rebuilt).cast(None)  # the new generation's group works
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "skip": verdict.skip, "save": verdict.save, "stop": verdict.stop,
        "values": dict(verdict.values), "same_after_rebuild": again == verdict,
        "new_group": rebuilt is not control, "generation": _dist.groups.generation,
    }))
    _dist.groups.destroy()
    dist.destroy_process_group()


def test_one_all_reduce_gives_every_slot_its_maximum_or_minimum(tmp_path: Path) -> None:
    mp.start_processes(worker, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1]
    assert seen[0] == {
        "skip": True, "save": True, "stop": "signal",
        "values": {"bad": 1, "signal": 15, "due": 1, "free_gib": 25, "worst_ms": 12},
        "same_after_rebuild": True, "new_group": True, "generation": 1,
    }
