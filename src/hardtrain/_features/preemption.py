"""Preemption: a signal becomes a vote to stop; every rank stops at one step and exits.

While ``fit`` runs, ``PreemptionGuard`` records the policy's signals (the handler only
sets a flag) and the data's loader workers ignore them. The signal's number goes into the
ballot; when any rank has one, every rank stops at this step: the deadline runs from the
earliest signal on any rank, the other features finish their part (checkpointing saves
if it fits), and this feature, called last, raises ``ht.Preempted``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
from collections.abc import Sequence
from typing import NoReturn

from hardtrain import _dist
from hardtrain._loop.protocol import Context, Effect, Feature, Slot, StepReport, Stop, Verdict
from hardtrain._redact import scrub
from hardtrain.errors import Preempted
from hardtrain.preemption import (
    PreemptionGuard,
    PreemptionPolicy,
    shield_loader_workers,
    signal_name,
)

logger = logging.getLogger(__name__)
_EXIT_SHARE = 0.1  # of the preemption deadline, left for the process to exit
_SLOT = "preemption.signal"


class Preemption(Feature):
    name = "preemption"
    slots = (Slot(_SLOT, Effect.STOP),)

    def __init__(self, policy: PreemptionPolicy) -> None:
        self.policy = policy
        self._stack = contextlib.ExitStack()
        self._guard: PreemptionGuard | None = None

    def open(self, ctx: Context) -> None:
        self._guard = self._stack.enter_context(PreemptionGuard(self.policy, clock=ctx.clock))
        ctx.state.guard_batches(
            self._stack.enter_context(shield_loader_workers(ctx.state.data, self.policy)))
        self._stack.callback(ctx.state.guard_batches, None)
        if not self._guard.armed:
            ctx.events.record("preemption_unarmed", level=logging.WARNING,
                              reason="fit is not running in the main thread, where signal "
                              "handlers must be installed; signals keep their default action")

    def vote(self, report: StepReport | None) -> Sequence[int]:
        guard = self._guard
        return (guard.signum or 0,) if guard is not None else (0,)

    def stop(self, ctx: Context, verdict: Verdict) -> Stop:
        """Collective. The signal's time on every rank: the deadline runs from the
        earliest (clocks differ between hosts: each rank sends the time since)."""
        guard = self._guard
        assert guard is not None
        signum = verdict[_SLOT]
        now = ctx.clock()
        elapsed = 0.0 if guard.received_at is None else now - guard.received_at
        seen = _dist.all_gather_json({"signal": guard.signum, "elapsed": elapsed}, ctx.group)
        received_at = now - max(float(s["elapsed"]) for s in seen)
        deadline_s = self.policy.deadline_s
        step = ctx.state.step
        ctx.events.record("preemption_requested", level=logging.WARNING, step=step,
                          signal=signal_name(signum),
                          signalled_ranks=[r for r, s in enumerate(seen) if s["signal"]])
        return Stop(owner=self.name, reason="preemption", step=step,
                    deadline_at=received_at + deadline_s * (1 - _EXIT_SHARE),
                    skipped=verdict.skip,
                    detail={"signum": signum, "received_at": received_at,
                            "deadline_s": deadline_s})

    def exit(self, ctx: Context, stop: Stop) -> NoReturn:
        """Called last, once the other features are done: ``preempted``, then exit."""
        guard = self._guard
        assert guard is not None
        signum: int = stop.detail["signum"]
        step = stop.step
        last = None if ctx.checkpoints is None else ctx.checkpoints.last
        saved = last is not None and last.step == step
        code = self.policy.exit_code_for(signum)
        ctx.events.record(
            "preempted", level=logging.WARNING, step=step, signal=signal_name(signum),
            exit_code=code, saved=saved, checkpoint_step=None if last is None else last.step,
            since_signal_s=round(ctx.clock() - stop.detail["received_at"], 3),
            deadline_s=stop.detail["deadline_s"], num_signals=guard.num_received,
        )
        where = ("this step is checkpointed" if saved else
                 f"the newest checkpoint is {last.path}" if last is not None else
                 "there is no checkpoint")
        message = scrub(f"stopped at step {step} on {signal_name(signum)}; {where}. "
                        f"Exit code {code}: start the same command again to continue.")
        logger.warning("rank=%d %s", ctx.rank, message)
        # The interpreter's exit is part of the grace period: its last garbage collection
        # over torch's objects takes ~1 s. Objects alive now are frozen at exit (not if the
        # caller catches Preempted and goes on), so that collection skips them.
        atexit.unregister(gc.freeze)  # once, however many times fit was preempted
        atexit.register(gc.freeze)
        raise Preempted(code, message, step=step, signal=signal_name(signum),
                        checkpoint=last, saved=saved)

    def close(self, ctx: Context, error: BaseException | None) -> None:
        """The signals' previous handlers and the loader's ``worker_init_fn`` go back."""
        self._stack.close()
