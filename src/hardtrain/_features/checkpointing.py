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
from typing import Any, NoReturn

from hardtrain import _dist
from hardtrain._loop.protocol import (
    Context,
    Effect,
    Feature,
    Slot,
    StepReport,
    Stop,
    Verdict,
)
from hardtrain.checkpoint import CheckpointInfo, CheckpointStore, LoadedCheckpoint
from hardtrain.checkpoint._policy import CheckpointPolicy
from hardtrain.errors import CheckpointStorageError, CheckpointWriteError

logger = logging.getLogger(__name__)


class Checkpointing(Feature):
    """Saves when due and at a stop; the ``Checkpoints`` service of the run."""

    name = "checkpoint"
    slots = (Slot("checkpoint.due", Effect.SAVE), Slot("checkpoint.unsaved", Effect.STOP))

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
        self._inflight_step: int | None = None
        self._committed_at = 0.0  # clock() at the last commit (or the start)
        self._failure: str | None = None  # why the last save failed, until one commits
        self._failed_step: int | None = None

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
        """Collective. The store, and its preflight on every rank: storage that cannot take
        a checkpoint stops the run here, before the first step, not at the first save."""
        self._store = CheckpointStore(ctx.run_dir, keep_last=self.policy.keep_last,
                                      events=ctx.events, storage_options=ctx.storage_options,
                                      retry_for=self.policy.retry_for)
        self._ctx = ctx
        self.saved_at = self._committed_at = self._clock()
        try:
            self._store.preflight()
            error = None
        except CheckpointStorageError as e:
            error = str(e)
        errors = _dist.all_gather_json(error, ctx.group)
        if any(errors):
            raise CheckpointStorageError("; ".join(
                e if len(errors) == 1 else f"rank {r}: {e}" for r, e in enumerate(errors) if e))

    def load_state_dict(self, state: Mapping[str, Any] | None,
                        checkpoint: CheckpointInfo) -> None:
        self.last = checkpoint
        self.saved_step = checkpoint.step

    def vote(self, report: StepReport | None) -> Sequence[int]:
        """Due once ``report``'s step is done? The final step, every N steps, or every
        ``every`` of wall-clock time (not while a save is still being written). And stop
        when saves have failed for longer than ``max_unsaved`` since the last commit."""
        if report is None:
            return (0, self._unsaved_too_long())
        self._collect(block=False)
        step = report.step + 1
        every = self.policy.every_steps
        if report.final or (every is not None and step % every == 0):
            return (1, self._unsaved_too_long())
        every_s = self._every_s
        due = (every_s is not None and not self.saving
               and self._clock() - self.saved_at >= every_s)
        return (int(due), self._unsaved_too_long())

    def stop(self, ctx: Context, verdict: Verdict) -> Stop:
        return Stop(owner=self.name, reason="unsaved", step=ctx.state.step, deadline_at=None,
                    skipped=verdict.skip, detail={})

    def exit(self, ctx: Context, stop: Stop) -> NoReturn:
        """No checkpoint has committed for ``max_unsaved``: say how long, why, and where a
        restart would resume."""
        self._finish_or_abandon(None)
        since = self._clock() - self._committed_at
        last = self.last
        where = (f"a restart resumes from step {last.step} ({last.path})" if last is not None
                 else "no checkpoint of this run has committed: a restart starts from scratch")
        message = (f"no checkpoint has committed for {since:.0f} s (max_unsaved="
                   f"{self.policy.max_unsaved_s:.0f} s) at step {stop.step}; the last save "
                   f"(step {self._failed_step}) failed: {self._failure}. Training stops so "
                   f"that no more work is at risk; {where}.")
        ctx.events.record("checkpoint_unsaved_too_long", level=logging.ERROR, step=stop.step,
                          since_commit_s=round(since, 3),
                          max_unsaved_s=self.policy.max_unsaved_s, error=self._failure,
                          checkpoint_step=None if last is None else last.step)
        raise CheckpointStorageError(message)

    def on_stop(self, ctx: Context, stop: Stop) -> None:
        """Collective. The state is written once: when earlier saves say this step can be
        saved before the deadline, a save in flight (of an earlier step) is abandoned and
        this step is saved; otherwise the save in flight is finished if it can be (else
        abandoned at the deadline) and the run stops at its step. The previous committed
        checkpoint stays valid throughout. A discarded step is not saved: the restart must
        meet it again."""
        deadline_at = stop.deadline_at
        self._settle_failure()

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
        """Finish the save in flight (a committed checkpoint beats a fast exit); its
        failure is already an event."""
        if self._store is not None:
            with contextlib.suppress(CheckpointStorageError):
                self._store.close()

    # ------------------------------------------------------------ the Checkpoints service

    def load(self, step: int | None = None,
             check: Callable[[LoadedCheckpoint], None] | None = None) -> LoadedCheckpoint:
        return self.store.load(step=step, check=check)

    def read_file(self, step: int, name: str) -> bytes:
        return self.store.read_file(step, name)

    def committed_steps(self) -> list[int]:
        return [i.step for i in self.store.list() if i.problem is None]

    def set_aside_after(self, step: int, reason: str) -> None:
        self.store.set_aside_after(step, reason)

    def save(self, *, sync: bool = False, final: bool = False) -> None:
        """Collective when distributed. Checkpoint the current step. A failure of the
        storage is an event and a warning, and training goes on (``max_unsaved``), except
        for the final checkpoint."""
        started = time.perf_counter()
        state, tensors, files = self.ctx.snapshot()
        self._collect(block=True)  # its result, before save_async waits it away
        self._capture_s = time.perf_counter() - started
        step = self.ctx.state.step
        self.saved_step = step
        if self.policy.async_save and not sync:
            self.store.save_async(step, tensors, state, files=files)
            self.saving, self._inflight_step = True, step
            return
        try:
            self._committed(self.store.save(step, tensors, state, files=files))
        except CheckpointStorageError as e:
            if final:
                raise
            self._save_failed(step, e)

    def drain(self) -> None:
        self._collect(block=True)

    def save_final(self) -> None:
        """Collective. The final checkpoint (unless this step is saved) and its commit;
        its failure is raised."""
        self._settle_failure()
        if self.saved_step != self.ctx.state.step:
            self.save(final=True)
        self._collect(block=True, final=True)

    # ------------------------------------------------------------------------ internals

    def _collect(self, *, block: bool, final: bool = False) -> None:
        """If the background save has finished (or ``block``: once it has), take its
        result. A failure of the storage is raised only for the ``final`` one."""
        if self.saving and (block or not self.store.saving):
            self.saving = False
            try:
                info = self.store.wait()
            except CheckpointStorageError as e:
                if final:
                    raise
                self._save_failed(self._inflight_step, e)
                return
            if info is not None:
                self._committed(info)

    def _committed(self, info: CheckpointInfo) -> None:
        self.last = info
        self.saved_at = self._committed_at = self._clock()
        self._failure = self._failed_step = None
        self._costs.append(self._capture_s + (info.blocking_s or 0) + (info.persist_s or 0))

    def _save_failed(self, step: int | None, error: CheckpointStorageError) -> None:
        """Not collective (each rank learns it when its thread is done): the next save
        when due again; a stop once nothing has committed for ``max_unsaved``."""
        self._failure, self._failed_step = str(error), step
        self.saved_at = self._clock()
        since = self._clock() - self._committed_at
        logger.warning(
            "rank=%d the checkpoint of step %s failed (%s); training goes on and the next "
            "save is tried when due. No checkpoint has committed for %.0f s; the run stops "
            "after %.0f s without one (max_unsaved).", self.ctx.rank, step, error, since,
            self.policy.max_unsaved_s)

    def _settle_failure(self) -> None:
        """Collective. When the newest save asked for failed on any rank, the saved step is
        the last committed one on every rank (each rank learns of a failure in its own
        time)."""
        failed = self._failed_step is not None and self._failed_step == self.saved_step
        if _dist.agree(failed, self.ctx.group):
            self.saved_step = None if self.last is None else self.last.step

    def _unsaved_too_long(self) -> int:
        """1 when saves have failed since the last commit, none is being written, and
        the last commit (or the start) is older than ``max_unsaved``."""
        return int(self._failure is not None and not self.saving
                   and self._clock() - self._committed_at > self.policy.max_unsaved_s)

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
        except CheckpointStorageError as e:  # an event already
            info = None
            self._failure, self._failed_step = str(e), self._inflight_step
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
