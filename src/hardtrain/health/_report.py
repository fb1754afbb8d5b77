"""What a probe found: one ``ProbeResult`` per GPU and probe, gathered in a
``HealthReport`` with one verdict. Both are plain data and round-trip through JSON."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from hardtrain.errors import UnhealthyDeviceError


class HealthStatus(enum.Enum):
    """One probe's finding. Only HEALTHY means "checked and fine"."""

    HEALTHY = "healthy"
    WARN = "warn"  # usable, but look (a throttle, a misconfigured node, an old ECC error)
    UNHEALTHY = "unhealthy"  # do not train on it
    NOT_APPLICABLE = "not_applicable"  # the GPU or driver does not have this (NotSupported)
    UNAVAILABLE = "unavailable"  # could not check (no NVML, no dcgmi, an error, a timeout)


class HealthAction(enum.Enum):
    """What the finding asks of whoever acts on it, mildest first."""

    NONE = "none"
    MONITOR = "monitor"  # keep training, keep watching
    FIX_CONFIG = "fix_config"  # the node's set-up is wrong (persistence mode, link width)
    RESTART = "restart"  # the job's GPU context died: restart from a checkpoint, same GPU
    RESET_GPU = "reset_gpu"  # drain the GPU's work, reset it (nvidia-smi -r), probe again
    REBOOT = "reboot"  # the driver asks for the node to be rebooted
    DRAIN = "drain"  # take the node out of service; hardware needs a person


# The overall verdict is the worst status by this order; NOT_APPLICABLE counts for nothing.
_SEVERITY = {HealthStatus.NOT_APPLICABLE: 0, HealthStatus.HEALTHY: 1, HealthStatus.WARN: 2,
             HealthStatus.UNAVAILABLE: 3, HealthStatus.UNHEALTHY: 4}
_ACTIONS = list(HealthAction)


def severity(status: HealthStatus) -> int:
    """How bad ``status`` is, for ordering: NOT_APPLICABLE < HEALTHY < WARN < UNAVAILABLE <
    UNHEALTHY."""
    return _SEVERITY[status]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One probe on one GPU (``gpu`` None: the host, such as "NVML is missing").

    probe: its name, e.g. ``ecc.uncorrected``, ``nvlink.state``, ``dcgm.diag.memory``.
    value: what was read (JSON-safe: a number, string, list or dict), None if nothing.
    threshold: what the value was held against, None where there is no number.
    reason: one line for a person; for WARN and UNHEALTHY it names the runbook.
    gpu, uuid: NVML's index and the GPU's UUID (None where unknown).
    """

    probe: str
    status: HealthStatus
    value: Any = None
    threshold: Any = None
    reason: str = ""
    gpu: int | None = None
    uuid: str | None = None
    action: HealthAction = HealthAction.NONE
    runbook: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(status=self.status.value, action=self.action.value)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"probe result: unknown keys {sorted(unknown)}")
        return cls(**{**data, "status": HealthStatus(data["status"]),
                      "action": HealthAction(data.get("action", "none"))})

    def where(self) -> str:
        if self.gpu is None:
            return "host"
        return f"GPU {self.gpu}" + (f" ({self.uuid})" if self.uuid else "")


@dataclasses.dataclass(frozen=True)
class HealthReport:
    """Every probe's result on one host, and the verdict.

    ``verdict``: UNHEALTHY if any result is; else UNAVAILABLE if any probe could not
    check (or nothing was checked at all); else WARN if any result warns; else HEALTHY.
    A probe that could not run therefore never counts as healthy.
    """

    host: str
    checked_at: float  # time.time() when the probe finished
    results: tuple[ProbeResult, ...]

    @property
    def verdict(self) -> HealthStatus:
        statuses = {r.status for r in self.results}
        if statuses <= {HealthStatus.NOT_APPLICABLE}:
            return HealthStatus.UNAVAILABLE  # nothing was checked
        return max(statuses, key=_SEVERITY.__getitem__)

    @property
    def action(self) -> HealthAction:
        """The strongest action any result asks for."""
        return max((r.action for r in self.results), key=_ACTIONS.index,
                   default=HealthAction.NONE)

    def with_status(self, *statuses: HealthStatus) -> list[ProbeResult]:
        return [r for r in self.results if r.status in statuses]

    def problems(self) -> list[ProbeResult]:
        """UNHEALTHY, then UNAVAILABLE, then WARN results: what a person reads first."""
        bad = [r for r in self.results if _SEVERITY[r.status] >= _SEVERITY[HealthStatus.WARN]]
        return sorted(bad, key=lambda r: -_SEVERITY[r.status])

    def raise_for_status(self, *, allow_unavailable: bool = False) -> None:
        """Raise ``UnhealthyDeviceError`` naming the first failing GPU, probe, value and
        runbook if the verdict is UNHEALTHY, or UNAVAILABLE (unless ``allow_unavailable``:
        a caller who accepts training unchecked says so)."""
        verdict = self.verdict
        if verdict is HealthStatus.HEALTHY or verdict is HealthStatus.WARN or (
                verdict is HealthStatus.UNAVAILABLE and allow_unavailable):
            return
        problems = self.problems()
        first = problems[0] if problems else None
        raise UnhealthyDeviceError(_message(self, first, len(problems)), report=self,
                                   result=first)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "checked_at": self.checked_at,
                "verdict": self.verdict.value, "action": self.action.value,
                "results": [r.to_json() for r in self.results]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HealthReport:
        """The report ``to_json`` wrote; ``verdict`` and ``action`` are recomputed."""
        return cls(host=data["host"], checked_at=float(data["checked_at"]),
                   results=tuple(ProbeResult.from_json(r) for r in data["results"]))


def _message(report: HealthReport, first: ProbeResult | None, num_problems: int) -> str:
    if first is None:  # no result at all
        return (f"{report.host}: nothing was checked (no probe ran, or none applies to "
                "these GPUs); not counted as healthy. See docs/health.md")
    more = f" ({num_problems - 1} more problem(s) in the report)" if num_problems > 1 else ""
    if first.status is HealthStatus.UNAVAILABLE:
        return (f"{report.host}: GPU health could not be checked{more}: {first.where()} "
                f"{first.probe}: {first.reason}. Not counted as healthy: fix what stops the "
                "probe, or pass allow_unavailable=True to train unchecked. See docs/health.md")
    value = f"value {first.value!r}" + (
        f", threshold {first.threshold!r}" if first.threshold is not None else "")
    return (f"{report.host}: {first.where()} is unhealthy{more}: {first.probe} ({value}): "
            f"{first.reason}")
