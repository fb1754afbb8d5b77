"""The NaN guard: a step whose loss or gradient norm is not finite (or spikes) on any rank
is skipped on every rank; when bad steps persist, the run rolls back to the newest
checkpoint that healthy steps followed, leaving out the batches consumed since; out of
rollbacks, ``ht.NonFiniteLossError`` with a diagnosis.

It measures through the loop (``measures``: the loss and gradient norm on the host, the
one sync of the step), votes "bad" in the ballot, and keeps the batch log and the
rollback count (``NanWatch``, saved with every checkpoint) here, in one place.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from hardtrain import _dist
from hardtrain._loop.protocol import Context, Effect, Feature, Slot, StepReport, Verdict
from hardtrain.checkpoint import CheckpointInfo
from hardtrain.errors import NonFiniteLossError
from hardtrain.numerics import NanPolicy, NanWatch, StepHealth

_MAX_BATCH_LOG = 1_000_000  # (step, batch id) pairs kept for a rollback's skip list
_SLOT = "nan.bad"


class NanGuard(Feature):
    name = "nan"
    slots = (Slot(_SLOT, Effect.SKIP),)
    measures = True

    def __init__(self, policy: NanPolicy) -> None:
        self.policy = policy
        self.watch = NanWatch(policy)
        self._batch_log: deque[tuple[int, tuple[int, int]]] = deque(maxlen=_MAX_BATCH_LOG)
        self._health: StepHealth | None = None  # this attempt's, as measured

    def load_state_dict(self, state: Mapping[str, Any] | None,
                        checkpoint: CheckpointInfo) -> None:
        # A rollback reloads an older checkpoint: the count of this run never goes down.
        saved = 0 if state is None else int(state.get("num_rollbacks", 0))
        self.watch.num_rollbacks = max(self.watch.num_rollbacks, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"num_rollbacks": self.watch.num_rollbacks}

    def vote(self, report: StepReport | None) -> Sequence[int]:
        if report is None or report.loss_value is None:
            self._health = None
            return (0,)
        grad_norm = report.grad_norm
        self._health = health = StepHealth(
            report.loss_value, grad_norm,
            scaler_skipped=report.scaled and grad_norm is not None and not math.isfinite(
                grad_norm),
        )
        return (int(health.problem(self.watch.spike_limit()) is not None),)

    def after_vote(self, ctx: Context, verdict: Verdict, report: StepReport) -> None:
        for batch in report.batches:  # which batches a rollback would leave out
            self._batch_log.append((report.step, batch))
        if verdict[_SLOT]:  # bad on some rank: every rank skips it
            self._skipped(ctx, report)
        elif not verdict.skip and self._health is not None:
            self.watch.healthy(ctx.state.step, self._health, report.lr)

    def summary(self) -> Mapping[str, Any]:
        watch = self.watch
        return {"num_skipped": watch.num_skipped, "num_scaler_skipped": watch.num_scaler_skipped,
                "num_rollbacks": watch.num_rollbacks}

    def _skipped(self, ctx: Context, report: StepReport) -> None:
        """Collective when distributed. Record the skip; when bad steps persist (or the
        step was manual: it already happened), roll back."""
        mine = self._health_json()
        seen = _dist.all_gather_json(mine, ctx.group)
        # A NaN loss on one rank makes every rank's gradients NaN through DDP's all-reduce:
        # the rank with the bad loss is where it began.
        ranks = [r for r, h in enumerate(seen) if h["reason"] is not None]
        first = next((r for r in ranks if seen[r]["reason"] == "loss"), ranks[0])
        failure = {"step": report.step, "reason": seen[first]["reason"], "first_rank": first,
                   "ranks": ranks, "loss": seen[first]["loss"],
                   "grad_norm": seen[first]["grad_norm"], "lr": report.lr}
        roll_back = self.watch.skipped(failure) or report.manual
        ctx.events.record("step_skipped", level=logging.WARNING, **failure,
                          consecutive=self.watch.consecutive, applied=report.manual)
        if roll_back:
            self._roll_back(ctx)

    def _health_json(self) -> dict[str, Any]:
        health = self._health
        if health is None:
            return {"reason": None, "loss": None, "grad_norm": None}
        return {"reason": health.problem(self.watch.spike_limit()), "loss": health.loss,
                "grad_norm": health.grad_norm}

    def _roll_back(self, ctx: Context) -> None:
        """Collective when distributed. Load the newest checkpoint that healthy steps
        followed, set newer ones aside, and leave out the batches consumed since it."""
        watch, failing_step = self.watch, ctx.state.step
        if watch.num_rollbacks >= self.policy.max_rollbacks:
            raise NonFiniteLossError(watch.diagnosis(ctx.world_size))
        checkpoints = ctx.checkpoints
        if checkpoints is None:
            raise NonFiniteLossError(
                f"bad steps persisted at step {failing_step}, and with checkpoint=None there is "
                "nothing to roll back to.\n  " + watch.diagnosis(ctx.world_size))
        checkpoints.drain()
        good = [s for s in checkpoints.committed_steps() if s < failing_step]
        # rank 0's choice for all: another rank may list the folder while rank 0's save
        # thread is still pruning it
        target = _dist.all_gather_json(good[-1] if good else None, ctx.group)[0]
        if target is None:
            raise NonFiniteLossError(
                f"bad steps persisted at step {failing_step} and no checkpoint before it to "
                "roll back to (with keep_last=1 the one before the newest is gone).\n  "
                + watch.diagnosis(ctx.world_size))
        consumed = sorted({b for s, b in self._batch_log if s >= target})
        # The abandoned timeline's checkpoints are set aside (renamed, kept, never deleted)
        # so that their steps can be saved again. The target stays as it is: a crash
        # before the next checkpoint replays from it, meets the same bad steps and rolls
        # back the same way.
        if ctx.rank == 0:
            checkpoints.set_aside_after(target, f"rolled back from step {failing_step} to "
                                        f"{target}")
        _dist.agree(False, ctx.group)  # the ranks meet: those folders are gone for all
        ctx.reload(target)
        watch.rolled_back()
        if self.policy.skip_data:
            ctx.state.skip_batches(consumed)
        ctx.events.record(
            "rolled_back", level=logging.WARNING, from_step=failing_step, to_step=target,
            skipped_batches=[list(b) for b in consumed] if self.policy.skip_data else [],
            num_rollbacks=watch.num_rollbacks, max_rollbacks=self.policy.max_rollbacks,
        )
