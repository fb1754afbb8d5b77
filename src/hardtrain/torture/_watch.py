"""Watching a start while torture runs: when it begins training, the steps it logs, its
exit, and the run's first checkpoint (kept as evidence of where a fresh start's RNG
streams are)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hardtrain.checkpoint import CheckpointStore
from hardtrain.torture._compare import NoEvents, differing_streams, fresh_streams
from hardtrain.torture._jobs import POLL_S, Job, exit_text
from hardtrain.torture._logs import StartRecord, Tail, first, rank0, start_events
from hardtrain.torture._reports import FreshStarts

BEGAN = ("training_started", "resumed")
FIRSTS = "first-checkpoints"  # in the work dir while torture runs


def await_training(job: Job, start: StartRecord, limit_s: float,
                    first_checkpoint: FirstCheckpoint) -> dict[str, Any] | None:
    """Rank 0's ``training_started`` or ``resumed`` event once this start wrote it; None
    if it exited 0 before. Raises TortureError if it exited otherwise, or did not begin
    within ``limit_s`` of its launch."""
    while True:
        event = first(start_events(job.run_dir, start, complete=True), *BEGAN)
        if event is not None:
            return event
        code = job.proc.poll()
        if code is not None:
            if code == 0:
                return None
            raise job.fail(f"start {start.number} of the tortured run ended on its own "
                           f"({exit_text(code)}) before training began")
        if time.monotonic() - job.launched > limit_s:
            raise job.fail(f"start {start.number} of the tortured run did not begin training "
                           f"within {limit_s:.0f}s (--timeout)")
        first_checkpoint.poll()
        time.sleep(POLL_S)


def await_step(job: Job, start: StartRecord, target: int, limit_s: float,
                logged: LoggedSteps, first_checkpoint: FirstCheckpoint) -> bool:
    """True once this start has logged a step >= ``target`` (rank 0's metrics.jsonl),
    False if it exited 0 before. Raises TortureError if it exited otherwise, or did not
    get there within ``limit_s`` of its launch."""
    while True:
        newest = logged.newest()
        if newest is not None and newest >= target:
            return job.proc.poll() is None
        code = job.proc.poll()
        if code is not None:
            if code == 0:
                return False
            raise job.fail(f"start {start.number} of the tortured run ended on its own "
                           f"({exit_text(code)}) before its interruption")
        if time.monotonic() - job.launched > limit_s:
            seen = "none yet" if newest is None else f"up to step {newest}"
            raise job.fail(f"start {start.number} of the tortured run did not log step {target} "
                           f"within {limit_s:.0f}s (--timeout); it logged {seen}")
        first_checkpoint.poll()
        time.sleep(POLL_S)


def wait_exit(job: Job, timeout_s: float | None,
               first_checkpoint: FirstCheckpoint) -> int | None:
    """``job.wait_exit``, looking out for the run's first checkpoint meanwhile."""
    deadline = None if timeout_s is None else job.launched + timeout_s
    while (code := job.proc.poll()) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        first_checkpoint.poll()
        time.sleep(POLL_S)
    first_checkpoint.poll()
    return code


class LoggedSteps:
    """The newest step a start has logged, read from metrics.jsonl as its lines arrive
    (rank 0 writes them; they reach the file at each checkpoint and at least once a
    second)."""

    def __init__(self, run_dir: Path, start: StartRecord) -> None:
        self._tail = Tail(run_dir / "metrics.jsonl", start.metrics_offset)
        self._newest: int | None = None

    def newest(self) -> int | None:
        steps = [e["step"] for e in self._tail.read() if isinstance(e.get("step"), int)]
        if steps:
            self._newest = max(steps + ([] if self._newest is None else [self._newest]))
        return self._newest


class FirstCheckpoint:
    """The first checkpoint a run commits, kept (hard links, no copy) as soon as its
    ``checkpoint_saved`` event appears, before retention deletes it. Written by a start
    that resumed nothing, it shows where such a start's RNG streams are."""

    def __init__(self, work: Path, name: str) -> None:
        self.run_dir, self.kept_in = work / name, work / FIRSTS / name
        self._events = Tail(self.run_dir / "events.jsonl")
        self.step: int | None = None
        self.kept = False

    def poll(self) -> None:
        if self.step is not None:
            return
        saved = first(rank0(self._events.read()), "checkpoint_saved")
        if saved is not None and isinstance(saved.get("step"), int):
            self.step = saved["step"]
            self.kept = self._keep(saved["step"])

    def _keep(self, step: int) -> bool:
        infos = CheckpointStore(self.run_dir, events=NoEvents()).list()
        folder = next((Path(i.path) for i in infos if i.step == step), None)
        try:
            if folder is None:
                return False
            kept = self.kept_in / folder.relative_to(self.run_dir)
            kept.mkdir(parents=True)
            for file in folder.iterdir():
                os.link(file, kept / file.name)
        except (OSError, ValueError):  # deleted meanwhile, or no hard links: no evidence
            return False
        return True

    def beside(self, other: FirstCheckpoint) -> FreshStarts | None:
        """Both runs' first checkpoints compared on their RNG streams, if both were kept
        at the same step."""
        if not (self.kept and other.kept) or self.step != other.step or self.step is None:
            return None
        mine, theirs = fresh_streams(self.kept_in, self.step), fresh_streams(other.kept_in,
                                                                              self.step)
        if mine is None or theirs is None:
            return None
        return FreshStarts(self.step, differing_streams(mine, theirs))
