"""Numerical faults: what counts as a bad step, and when skipping turns into a rollback.

``NanPolicy`` decides; ``NanWatch`` keeps the counts and the history a diagnosis needs.
Neither touches tensors or ranks: the trainer measures each step once (one host-device
sync for the loss, the gradient norm and the scaler's verdict together), votes, and tells
the watch what happened.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from hardtrain.errors import NonFiniteLossError

__all__ = ["NanPolicy", "NanWatch", "NonFiniteLossError", "StepHealth"]


@dataclass(frozen=True, kw_only=True)
class NanPolicy:
    """What ``HardenedTrainer.fit`` does with non-finite losses and gradients.

    A step whose loss or gradient norm is NaN/Inf on any rank (or, with ``spike_zscore``,
    whose loss jumps above the recent ones) is skipped on every rank: no optimizer,
    scheduler or scaler step, and the step count does not advance. After
    ``max_consecutive`` skips in a row (or ``max_in_window`` within ``window`` steps), the
    run rolls back to the last known-good checkpoint (one that healthy steps followed)
    and, with ``skip_data``, leaves out the batches consumed from there through the
    failure. After ``max_rollbacks`` rollbacks, the next one raises
    ``ht.NonFiniteLossError`` with a diagnosis. Pass ``nan=None`` to the trainer to turn
    all of it off.

    max_consecutive: skipped steps in a row that trigger a rollback (>= 1).
    max_in_window: skipped steps within the last ``window`` attempted steps that trigger a
        rollback (>= 1), or None; ``window`` (>= max_in_window) with it.
    max_rollbacks: rollbacks allowed in one run, counted across restarts (>= 0). A
        rollback needs the checkpoint before the newest: use ``keep_last >= 2``.
    spike_zscore: also skip a step whose loss is more than this many standard deviations
        above the mean of the last ``spike_window`` healthy losses (> 0), or None.
    spike_window: healthy losses the spike test looks back on (>= 10); no spike is
        flagged before that many were seen.
    skip_data: on a rollback, leave out the batches consumed from the checkpoint through
        the failure (True), or replay them (False, for faults that are not in the data).
    """

    max_consecutive: int = 3
    max_in_window: int | None = None
    window: int | None = None
    max_rollbacks: int = 2
    spike_zscore: float | None = None
    spike_window: int = 100
    skip_data: bool = True

    def __post_init__(self) -> None:
        _check_int("max_consecutive", self.max_consecutive, 1)
        _check_int("max_rollbacks", self.max_rollbacks, 0)
        _check_int("spike_window", self.spike_window, 10)
        if (self.max_in_window is None) != (self.window is None):
            raise ValueError(f"max_in_window={self.max_in_window!r}, window={self.window!r}: "
                             "give both (e.g. max_in_window=5, window=100) or neither")
        if self.max_in_window is not None and self.window is not None:
            _check_int("max_in_window", self.max_in_window, 1)
            _check_int("window", self.window, self.max_in_window)
        if self.spike_zscore is not None and not (
            isinstance(self.spike_zscore, int | float) and not isinstance(self.spike_zscore, bool)
            and math.isfinite(self.spike_zscore) and self.spike_zscore > 0
        ):
            raise ValueError(f"spike_zscore={self.spike_zscore!r}: must be a number > 0 (e.g. "
                             "6.0), or None for no spike detection")
        if not isinstance(self.skip_data, bool):
            raise ValueError(f"skip_data={self.skip_data!r}: must be True or False")


def _check_int(field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field}={value!r}: must be an int >= {low}")


@dataclass(frozen=True)
class StepHealth:
    """One attempted step, as measured on this rank."""

    loss: float
    grad_norm: float | None
    scaler_skipped: bool = False  # the GradScaler found inf/NaN gradients and skipped

    def problem(self, spike_limit: float | None) -> str | None:
        """Why this step is bad, or None. A scaler's own skip is not a problem here."""
        if not math.isfinite(self.loss):
            return "loss"
        if self.grad_norm is not None and not math.isfinite(self.grad_norm) and (
            not self.scaler_skipped
        ):
            return "grad_norm"
        if spike_limit is not None and self.loss > spike_limit:
            return "spike"
        return None


class NanWatch:
    """Counts skips for one run and says when to roll back; keeps the recent history."""

    def __init__(self, policy: NanPolicy, num_rollbacks: int = 0) -> None:
        self.policy = policy
        self.consecutive = 0
        self.num_rollbacks = num_rollbacks
        self.num_skipped = 0
        self.num_scaler_skipped = 0
        self._recent: deque[bool] = deque(maxlen=policy.window or 1)  # True: skipped
        self._losses: deque[float] = deque(maxlen=policy.spike_window)
        self.history: deque[dict[str, Any]] = deque(maxlen=20)
        self.failures: list[dict[str, Any]] = []  # this streak's bad steps, for a diagnosis

    def spike_limit(self) -> float | None:
        """The loss above which a step is a spike, or None (off, or too few seen)."""
        z = self.policy.spike_zscore
        if z is None or len(self._losses) < self.policy.spike_window:
            return None
        mean = math.fsum(self._losses) / len(self._losses)
        var = math.fsum((x - mean) ** 2 for x in self._losses) / len(self._losses)
        return mean + z * math.sqrt(var)

    def healthy(self, step: int, health: StepHealth, lr: float | None) -> None:
        self.consecutive = 0
        self.failures.clear()
        self._recent.append(False)
        self._losses.append(health.loss)
        self.num_scaler_skipped += health.scaler_skipped
        self.history.append({"step": step, "loss": health.loss, "grad_norm": health.grad_norm,
                             "lr": lr})

    def skipped(self, failure: dict[str, Any]) -> bool:
        """Record a skipped step; True when it is time to roll back."""
        self.consecutive += 1
        self.num_skipped += 1
        self._recent.append(True)
        self.failures.append(failure)
        self.history.append(failure)
        too_many = (self.policy.max_in_window is not None
                    and sum(self._recent) >= self.policy.max_in_window)
        return self.consecutive >= self.policy.max_consecutive or too_many

    def rolled_back(self) -> None:
        self.num_rollbacks += 1
        self.consecutive = 0
        self._recent.clear()
        self.failures.clear()

    def diagnosis(self, world_size: int) -> str:
        first = self.failures[0] if self.failures else {}
        lines = [
            f"bad steps persisted after {self.num_rollbacks} rollback(s) "
            f"(max_rollbacks={self.policy.max_rollbacks}): "
            f"{len(self.failures)} skipped in a row at step {first.get('step')}",
            f"first seen on rank {first.get('first_rank')} of {world_size} (bad on rank(s) "
            f"{first.get('ranks')}): "
            f"{first.get('reason')} (loss={first.get('loss')}, "
            f"grad_norm={first.get('grad_norm')}, lr={first.get('lr')})",
            "recent steps (step, loss, grad_norm, lr): " + "; ".join(
                f"{h['step']} {h['loss']:.6g} {h['grad_norm']} {h['lr']}"
                + (f" [{h['reason']}]" if "reason" in h else "")
                for h in self.history
            ),
            "Check the learning rate and its warm-up, the data around these steps, mixed "
            "precision (a GradScaler, bf16), and the GPU's health (ECC, XID errors).",
        ]
        return "\n  ".join(lines)
