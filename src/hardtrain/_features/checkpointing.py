"""Checkpointing: when a save is due, the save (async or not), finishing or abandoning
the save in flight, and the save-if-it-fits part of a stop.

The feature votes "due" in the ballot; the loop saves when any rank voted it (and the
step was not discarded). It is also the run's ``Checkpoints`` service: the loop resumes
and reloads through it, the NaN guard lists and sets aside checkpoints through it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hardtrain import _dist
from hardtrain._loop.protocol import Context, Effect, Feature, Slot, StepReport, Stop
from hardtrain.checkpoint import CheckpointInfo, CheckpointStore, LoadedCheckpoint
from hardtrain.checkpoint._policy import CheckpointPolicy
from hardtrain.errors import CheckpointWriteError


class Checkpointing(Feature):
    """Saves when due and at a stop; the ``Checkpoints`` service of the run."""

    name = "checkpoint"
    slots = (Slot("checkpoint.due", Effect.SAVE),)

    def __init__(self, policy: CheckpointPolicy, clock: Callable[[], float]) -> None:
        self.policy = policy
        self._clock = clock
        self._every_s = policy.every_s
        self._store: CheckpointStore | None = None
        self._ctx: Context | None = None
        self.last: CheckpointInfo | None = None
        self.saved_step: int | None = None
        self.saved_at = 0.0  # clock() when the last save finished (or the run started)
        self.saving = False
        self._capture_s = 0.0  # the last save's capture time (before the store's part)
        self._costs: deque[float] = deque(maxlen=4)

    @property
    def store(self) -> CheckpointStore:
        assert self._store is not None, "the checkpointing feature is not open"
        return self._store

    @property
    def ctx(self) -> Context:
        assert self._ctx is not None, "the checkpointing feature is not open"
        return self._ctx

    # --------------------------------------------------------------------------- hooks

    def open(self, ctx: Context) -> None:
        self._store = CheckpointStore(ctx.run_dir, keep_last=self.policy.keep_last,
                                      events=ctx.events, storage_options=ctx.storage_options)
        self._ctx = ctx
        self.saved_at = self._clock()

    def load_state_dict(self, state: Mapping[str, Any] | None,
                        checkpoint: CheckpointInfo) -> None:
        self.last = checkpoint
        self.saved_step = checkpoint.step

    def vote(self, report: StepReport | None) -> Sequence[int]:
        """Due once ``report``'s step is done? The final step, every N steps, or every
        ``every`` of wall-clock time (not while a save is still being written)."""
        if report is None:
            return (0,)
        self._collect(block=False)
        step = report.step + 1
        every = self.policy.every_steps
        if report.final or (every is not None and step % every == 0):
            return (1,)
        every_s = self._every_s
        return (int(every_s is not None and not self.saving
                    and self._clock() - self.saved_at >= every_s),)

    def on_stop(self, ctx: Context, stop: Stop) -> None:
        """Collective. The state is written once: when earlier saves say this step can be
        saved before the deadline, a save in flight (of an earlier step) is abandoned and
        this step is saved; otherwise the save in flight is finished if it can be (else
        abandoned at the deadline) and the run stops at its step. The previous committed
        checkpoint stays valid throughout. A discarded step is not saved: the restart must
        meet it again."""
        deadline_at = stop.deadline_at

        def remaining_s() -> float | None:
            return None if deadline_at is None else deadline_at - self._clock()

        step = ctx.state.step
        if self.saved_step == step or step == 0 or stop.skipped:  # nothing new to keep
            self._finish_or_abandon(remaining_s())
            return
        left = remaining_s()
        too_slow = None if left is None else self._too_slow(left)
        if not _dist.agree(too_slow is not None, ctx.group):
            self._finish_or_abandon(0.0)  # not worth a second write (unless it is done)
            with contextlib.suppress(CheckpointWriteError):  # an event already
                self.save(sync=True)
            return
        self._finish_or_abandon(remaining_s())
        ctx.events.record(
            f"{stop.reason}_save_skipped", level=logging.WARNING, step=step,
            reason=too_slow or "another rank's estimate said it would not fit",
            deadline_s=stop.detail.get("deadline_s"),
            checkpoint_step=None if self.last is None else self.last.step,
        )

    def close(self, ctx: Context, error: BaseException | None) -> None:
        """Finish the save in flight (a committed checkpoint beats a fast exit)."""
        if self._store is not None:
            self._store.close()

    # ------------------------------------------------------------ the Checkpoints service

    def load(self, step: int | None = None) -> LoadedCheckpoint:
        return self.store.load(step=step)

    def read_file(self, step: int, name: str) -> bytes:
        return self.store.read_file(step, name)

    def committed_steps(self) -> list[int]:
        return [i.step for i in self.store.list() if i.problem is None]

    def set_aside_after(self, step: int, reason: str) -> None:
        self.store.set_aside_after(step, reason)

    def save(self, *, sync: bool = False) -> None:
        """Collective when distributed. Checkpoint the current step."""
        started = time.perf_counter()
        state, tensors, files = self.ctx.snapshot()
        self._collect(block=True)  # its result, before save_async waits it away
        self._capture_s = time.perf_counter() - started
        step = self.ctx.state.step
        if self.policy.async_save and not sync:
            self.store.save_async(step, tensors, state, files=files)
            self.saving = True
        else:
            self._committed(self.store.save(step, tensors, state, files=files))
        self.saved_step = step

    def drain(self) -> None:
        self._collect(block=True)

    def save_final(self) -> None:
        """Collective. The final checkpoint (unless this step is saved) and its commit."""
        if self.saved_step != self.ctx.state.step:
            self.save()
        self._collect(block=True)

    # ------------------------------------------------------------------------ internals

    def _collect(self, *, block: bool) -> None:
        """If the background save has finished (or ``block``: once it has), take its
        result, raising its error."""
        if self.saving and (block or not self.store.saving):
            self.saving = False
            info = self.store.wait()
            if info is not None:
                self._committed(info)

    def _committed(self, info: CheckpointInfo) -> None:
        self.last = info
        self.saved_at = self._clock()
        self._costs.append(self._capture_s + (info.blocking_s or 0) + (info.persist_s or 0))

    def _finish_or_abandon(self, budget_s: float | None) -> None:
        """Wait up to ``budget_s`` (None: as long as it takes) for the save in flight,
        then give it up; the previous checkpoint stays valid. Collective when distributed
        (the ranks' save threads agree on commit or not)."""
        if not self.saving:
            return
        self.saving = False
        try:
            info = self.store.wait(timeout=None if budget_s is None else max(budget_s, 0.0))
        except (TimeoutError, concurrent.futures.TimeoutError):  # not the same before 3.11
            info = self.store.abandon()
        except CheckpointWriteError:
            info = None  # recorded as checkpoint_save_failed (or _abandoned)
        if info is not None:
            self._committed(info)
        else:  # abandoned or failed: the saved step is the last committed one
            self.saved_step = None if self.last is None else self.last.step

    def _too_slow(self, remaining_s: float) -> str | None:
        """Why a save now would not fit in ``remaining_s``, judged by the slowest of the
        last saves; None when it fits (or nothing was measured yet: then it is tried)."""
        if remaining_s <= 0:
            return f"the deadline has passed ({-remaining_s:.1f} s ago)"
        if self._costs and max(self._costs) > remaining_s:
            return (f"earlier saves took up to {max(self._costs):.1f} s and {remaining_s:.1f} "
                    "s are left before the deadline")
        return None
