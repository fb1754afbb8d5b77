"""GPU health probes: NVML and dcgmi, each finding a ``ProbeResult`` in a
``HealthReport``; "could not check" is never counted as healthy.

    import hardtrain as ht
    from hardtrain import health

    baseline = health.take_baseline()          # before the first step
    with health.XidListener() as xids:         # XIDs are only seen while listening
        report = health.probe(baseline, xids=xids, dcgm_level=None)
        report.verdict                         # HealthStatus.HEALTHY, WARN, UNHEALTHY, ...
        report.raise_for_status()              # ht.UnhealthyDeviceError if not usable

Every threshold and decision is in ``hardtrain.health._rules``; docs/health.md has them
in prose, with the runbooks each finding names. ``hardtrain health`` is the command.
"""

from hardtrain.health._gpu import Baseline, GpuBaseline, take_baseline
from hardtrain.health._probe import probe
from hardtrain.health._report import HealthAction, HealthReport, HealthStatus, ProbeResult
from hardtrain.health._xid import XidEvent, XidListener

__all__ = [
    "Baseline",
    "GpuBaseline",
    "HealthAction",
    "HealthReport",
    "HealthStatus",
    "ProbeResult",
    "XidEvent",
    "XidListener",
    "probe",
    "take_baseline",
]
