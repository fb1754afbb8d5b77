"""``probe``: every check this host can run, as one ``HealthReport``."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

from hardtrain import _nvml
from hardtrain.health import _dcgm, _gpu
from hardtrain.health import _rules as rules
from hardtrain.health._gpu import Baseline
from hardtrain.health._report import HealthReport, ProbeResult
from hardtrain.health._xid import XidListener

log = logging.getLogger(__name__)


def probe(
    baseline: Baseline | None = None,
    *,
    xids: XidListener | None = None,
    dcgm_level: int | None = None,
    dcgm_health: bool = False,
    timeout_s: float | None = None,
    gpus: Collection[int] | None = None,
    nvml: Any = None,
    dcgmi: str = "dcgmi",
    clock: Callable[[], float] = time.monotonic,
) -> HealthReport:
    """Probe this host's GPUs; never raises for what it finds or cannot check (see
    ``HealthReport.raise_for_status`` for that). Safe to call from a background thread;
    it blocks for as long as NVML (milliseconds) and dcgmi (up to ``timeout_s``) take.

    baseline: from ``take_baseline()``; ECC and NVLink counts are then judged by what
        grew since. None: by their totals since the driver loaded (stricter for ECC).
    xids: an open ``XidListener``; adds an ``xid`` result per GPU. None: no XID check
        (one call cannot see XIDs from before it; a listener must have been open).
    dcgm_level: also run ``dcgmi diag -r LEVEL -j`` (1 quick, 2 medium, 3 long, 4
        extended: seconds to hours, and it loads the GPUs). None: no diag.
    dcgm_health: also run ``dcgmi health -c -j`` (needs ``dcgmi health -s a`` beforehand).
    timeout_s: seconds each dcgmi command may take before it is killed and reported
        UNAVAILABLE, > 0; None: ``_rules.DCGM_DIAG_TIMEOUT_S[level]`` or
        ``DCGM_HEALTH_TIMEOUT_S``.
    gpus: NVML indices to probe (NVML's order, not CUDA_VISIBLE_DEVICES'); None: all.
    nvml: an object with pynvml's functions (a fake in tests); None: pynvml.
    dcgmi: the dcgmi executable, looked up on PATH.
    clock: seconds, the same clock the baseline was taken with.
    """
    _check(dcgm_level, timeout_s)
    results, uuids = _nvml_results(nvml, baseline, xids, gpus, clock)
    if dcgm_level is not None:
        limit = timeout_s or rules.DCGM_DIAG_TIMEOUT_S[dcgm_level]
        results += _only(gpus, _dcgm.diag(dcgm_level, timeout_s=limit, dcgmi=dcgmi,
                                          uuids=uuids))
    if dcgm_health:
        limit = timeout_s or rules.DCGM_HEALTH_TIMEOUT_S
        results += _only(gpus, _dcgm.health(timeout_s=limit, dcgmi=dcgmi, uuids=uuids))
    report = HealthReport(host=socket.gethostname(), checked_at=time.time(),
                          results=tuple(results))
    log.debug("health_probed host=%s verdict=%s action=%s num_results=%d", report.host,
              report.verdict.value, report.action.value, len(report.results))
    return report


def _check(dcgm_level: int | None, timeout_s: float | None) -> None:
    if dcgm_level is not None and dcgm_level not in rules.DCGM_DIAG_TIMEOUT_S:
        raise ValueError(f"dcgm_level={dcgm_level!r}: must be 1, 2, 3 or 4, or None")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}: must be > 0 seconds, or None")


def _nvml_results(nvml: Any, baseline: Baseline | None, xids: XidListener | None,
                  gpus: Collection[int] | None, clock: Callable[[], float],
                  ) -> tuple[list[ProbeResult], dict[int, str | None]]:
    try:
        with _nvml.session(nvml) as lib:
            results, uuids = _gpu.probe_gpus(lib, baseline, gpus, clock())
    except _nvml.NvmlUnavailable as e:
        return [rules.result("nvml", rules.Finding(rules.UNAVAILABLE, str(e)))], {}
    if xids is not None:
        xids.poll()
        results += xids.results(uuids)
    return results, uuids


def _only(gpus: Collection[int] | None, results: list[ProbeResult]) -> list[ProbeResult]:
    return [r for r in results if gpus is None or r.gpu is None or r.gpu in gpus]
