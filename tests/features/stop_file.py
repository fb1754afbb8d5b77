"""An example feature, worked through in docs/architecture.md: stop the run when a file
appears. One rank seeing its file is enough: the ballot carries the vote, every rank stops
after the same step, checkpointing saves that step, and this feature exits last.

It lives in the tests because the feature protocol is private for now; a feature of the
library would be a module in ``hardtrain._features`` plus one line in the trainer's table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import NoReturn

import hardtrain as ht
from hardtrain._loop.protocol import Context, Effect, Feature, Slot, StepReport, Stop, Verdict


class StopFileSeen(SystemExit):
    """Exit status 0: the run was asked to stop, and it did so cleanly."""


class StopFile(Feature):
    """Stops every rank after the step in which ``path`` exists on any rank (``{rank}``
    in the path is this rank's number). Checks once every ``every_steps`` steps."""

    name = "stop_file"
    slots = (Slot("stop_file.seen", Effect.STOP),)

    def __init__(self, path: str, every_steps: int = 1) -> None:
        self.path = path
        self.every_steps = every_steps
        self._mine = path

    def open(self, ctx: Context) -> None:
        self._mine = self.path.format(rank=ctx.rank)

    def vote(self, report: StepReport | None) -> Sequence[int]:
        # local and O(1): one stat, no collective, no host-device sync
        if report is not None and (report.step + 1) % self.every_steps:
            return (0,)
        return (int(os.path.exists(self._mine)),)

    def stop(self, ctx: Context, verdict: Verdict) -> Stop:
        ctx.events.record("stop_file_seen", level=logging.WARNING, step=ctx.state.step,
                          path=self._mine, seen_here=os.path.exists(self._mine))
        return Stop(owner=self.name, reason="stop_file", step=ctx.state.step,
                    deadline_at=None, skipped=verdict.skip, detail={})

    def exit(self, ctx: Context, stop: Stop) -> NoReturn:
        last = None if ctx.checkpoints is None else ctx.checkpoints.last
        raise StopFileSeen(0 if last is not None and last.step == stop.step else 1)


class StopFileTrainer(ht.HardenedTrainer):
    """The trainer with the example feature in its table (the one line a feature adds)."""

    def __init__(self, *args: object, stop_file: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stop_file = stop_file

    def _features(self) -> list[Feature]:
        return [*super()._features(), StopFile(self.stop_file)]
