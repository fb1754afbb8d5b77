"""The run directory's lease: one job writes a run directory at a time.

``open``: rank 0 takes ``run_dir/lease.json`` (``hardtrain._lease``: at once, or after
watching the lease of a job on another host for one of its heartbeat periods); every rank
hears rank 0's outcome (one all-gather) and, when the lease is held by a live job, raises
the same ``RunDirInUseError`` before anything is written to the run directory. The
feature sits before the logs in the table, so a refused job opens no ``metrics.jsonl``.

While ``fit`` runs, a daemon thread on rank 0 renews the lease every heartbeat. A renewal
that fails (a storage blip) is an event, and the next one is tried a period later. A
renewal that finds another job's lease (that job judged this one dead and took it over)
stops this job: rank 0 votes STOP at the next step, every rank stops there without
saving (the save in flight is abandoned unless it is already done) and raises
``RunDirInUseError``, so the loser does not write checkpoints over the winner's.

``close`` stops the thread and deletes the lease if it is still ours: after a normal end,
an error, or ``ht.Preempted``. A killed job leaves it behind; the restart takes it over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from hardtrain import _dist
from hardtrain._lease import LEASE_FILE, Lease, LeaseRecord, Takeover
from hardtrain._loop.protocol import Context, Effect, Feature, Slot, StepReport, Stop, Verdict
from hardtrain.checkpoint._storage import open_storage
from hardtrain.errors import CheckpointStorageError, RunDirInUseError
from hardtrain.telemetry import EventSink

logger = logging.getLogger(__name__)
_SLOT = "lease.lost"
_NOT_LOST, _LOST = (0,), (1,)
_CLOSE_WAIT_S = 5.0  # for a renewal still writing when fit ends


class RunDirLease(Feature):
    """heartbeat_s: how often rank 0 renews the lease (``CheckpointPolicy.heartbeat``)."""

    name = "lease"
    slots = (Slot(_SLOT, Effect.STOP),)

    def __init__(self, heartbeat_s: float) -> None:
        self.heartbeat_s = heartbeat_s
        self._lease: Lease | None = None  # rank 0, while held
        self._events: EventSink | None = None
        self._lock = threading.Lock()  # one renewal or the release at a time
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False  # set by the thread, read by vote
        self._lost_to: LeaseRecord | None = None  # who holds it then (None: unreadable)

    # --------------------------------------------------------------------------- hooks

    def open(self, ctx: Context) -> None:
        """Collective. Rank 0 takes the lease; every rank raises if it was refused."""
        self._events = ctx.events
        outcome: dict[str, Any] = {}
        lease = None
        if ctx.rank == 0:
            try:
                lease = Lease(open_storage(ctx.run_dir, ctx.storage_options), self.heartbeat_s,
                              where=ctx.run_dir)
                taken = lease.acquire()
            except RunDirInUseError as e:
                outcome = {"refused": str(e), "holder": e.holder}
            except Exception as e:  # every rank must hear of it, not only rank 0
                outcome = {"failed": f"{type(e).__name__}: {e}"}
            else:
                outcome = {"held": True}
                self._record_acquired(ctx, lease, taken)
        try:
            outcome = _dist.all_gather_json(outcome, ctx.group)[0]
        except BaseException:
            if lease is not None and lease.held:
                lease.release()
            raise
        if "refused" in outcome:
            if ctx.rank == 0:
                ctx.events.record("lease_refused", level=logging.ERROR, holder=outcome["holder"])
            raise RunDirInUseError(outcome["refused"], outcome["holder"])
        if "failed" in outcome:
            raise CheckpointStorageError(
                f"{ctx.run_dir}: could not take the run directory's lease ({LEASE_FILE}) on "
                f"rank 0: {outcome['failed']}. Nothing was written to the run directory; "
                "check that the storage is reachable and writable (credentials, bucket, "
                "space), then start again.")
        if lease is not None:
            self._lease = lease
            self._thread = threading.Thread(target=self._renew_every_heartbeat,
                                            name="hardtrain-lease", daemon=True)
            self._thread.start()

    def vote(self, report: StepReport | None) -> Sequence[int]:
        return _LOST if self._lost else _NOT_LOST

    def stop(self, ctx: Context, verdict: Verdict) -> Stop:
        """Collective. Rank 0's account of the loss, for every rank; the deadline is now,
        so that no feature saves (a save in flight is abandoned unless it is done)."""
        return Stop(owner=self.name, reason="lease_lost", step=ctx.state.step,
                    deadline_at=ctx.clock(), skipped=verdict.skip, detail=self._loss(ctx))

    def exit(self, ctx: Context, stop: Stop) -> NoReturn:
        raise RunDirInUseError(stop.detail["message"], stop.detail["holder"])

    def on_stop(self, ctx: Context, stop: Stop) -> None:
        """Collective. Another feature's stop (a preemption) in the step the lease was
        lost: stop here, before the checkpointing saves into the other job's run_dir."""
        if _dist.agree(self._lost, ctx.group):
            loss = self._loss(ctx)
            raise RunDirInUseError(loss["message"], loss["holder"])

    def close(self, ctx: Context, error: BaseException | None) -> None:
        """Stop renewing and delete the lease if it is still ours. Never raises: a lease
        left behind is taken over by the next start (an event says so)."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        self._stopping.set()
        if not self._lock.acquire(timeout=_CLOSE_WAIT_S):
            ctx.events.record("lease_release_failed", level=logging.WARNING,
                              error=f"a renewal was still writing after {_CLOSE_WAIT_S:g} s",
                              note="the next start takes the lease over")
            return
        try:
            released = lease.release()
        except Exception as e:
            ctx.events.record("lease_release_failed", level=logging.WARNING,
                              error=f"{type(e).__name__}: {e}",
                              note="the next start takes the lease over")
        else:
            if released:
                ctx.events.record("lease_released")
        finally:
            self._lock.release()
        if self._thread is not None:
            self._thread.join(timeout=_CLOSE_WAIT_S)

    # ------------------------------------------------------------------------ internals

    def _record_acquired(self, ctx: Context, lease: Lease, taken: Takeover | None) -> None:
        record = lease.record
        assert record is not None
        if taken is not None:
            previous = None if taken.previous is None else taken.previous.public()
            ctx.events.record("lease_taken_over", level=logging.WARNING, previous=previous,
                              reason=taken.reason)
            who = "a lease that does not parse" if taken.previous is None else (
                f"the lease of {taken.previous.describe()}")
            logger.warning("rank=%d took over %s in %s: %s", ctx.rank, who, ctx.run_dir,
                           taken.reason)
        ctx.events.record("lease_acquired", host=record.host, pid=record.pid,
                          heartbeat_s=self.heartbeat_s, taken_over=taken is not None)

    def _renew_every_heartbeat(self) -> None:
        """The thread: renew every heartbeat until fit ends or the lease is lost."""
        lease, events, period = self._lease, self._events, self.heartbeat_s
        assert lease is not None and events is not None
        next_at = time.monotonic() + period
        num_failed = 0
        while not self._stopping.wait(max(0.0, next_at - time.monotonic())):
            next_at += period
            if next_at < time.monotonic():  # a slow renewal: no burst to catch up
                next_at = time.monotonic() + period
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    renewal = lease.renew()
                except Exception as e:
                    num_failed += 1
                    events.record("lease_renew_failed", level=logging.WARNING,
                                  error=f"{type(e).__name__}: {e}", num_failed=num_failed,
                                  next_in_s=period)
                    continue
            num_failed = 0
            if renewal.outcome == "restored":
                events.record("lease_restored", level=logging.WARNING,
                              note=f"{LEASE_FILE} was gone from the run directory; written again")
            elif renewal.outcome == "lost":
                holder = renewal.holder
                self._lost_to, self._lost = holder, True
                events.record("lease_lost", level=logging.ERROR,
                              holder=None if holder is None else holder.public())
                logger.error("rank=0 another job took over the lease on this run directory: "
                             "%s. This job stops at its next step without saving.",
                             "unreadable" if holder is None else holder.describe())
                return

    def _loss(self, ctx: Context) -> dict[str, Any]:
        """Collective. Rank 0's message and the new holder, on every rank."""
        found: dict[str, Any] = {}
        if ctx.rank == 0:
            holder = self._lost_to
            who = (f"another job ({LEASE_FILE} does not parse)" if holder is None
                   else holder.describe())
            found = {
                "holder": None if holder is None else holder.public(),
                "message": (
                    f"{ctx.run_dir}: another job took over this run directory's lease while "
                    f"this job ran: {who}. Usually it judged this job dead (its heartbeat did "
                    "not advance for a heartbeat period: storage unreachable, or the process "
                    "stalled); or both jobs wrote the lease at once. This job stopped after "
                    f"step {ctx.state.step} and saved nothing "
                    "more, so that it does not write over the other job's checkpoints. If "
                    "the other job should not run, stop it, then start this one again."),
            }
        return dict(_dist.all_gather_json(found, ctx.group)[0])
