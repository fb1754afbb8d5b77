"""Every decision the health probes take and every threshold they use, in one place
(docs/health.md, "The rules", says the same in prose). The readers (``_gpu``, ``_xid``,
``_dcgm``) only read values; the functions here turn values into a ``Finding``.

Where DCGM has a view, these follow it: its error severities (``dcgm_errors.c``) and its
limits (``DcgmGPUHardwareLimits.h``): NVLink replay and recovery errors fail at 1, CRC
errors at 100 per second, 512 uncorrectable row remaps warn, thermal and power clock
events are "monitor".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from hardtrain import _nvml
from hardtrain.errors import ECC_RUNBOOK, NVLINK_RUNBOOK, THROTTLING_RUNBOOK, XID_RUNBOOK
from hardtrain.health._report import HealthAction, HealthStatus, ProbeResult

HEALTHY, WARN, UNHEALTHY = HealthStatus.HEALTHY, HealthStatus.WARN, HealthStatus.UNHEALTHY
NOT_APPLICABLE, UNAVAILABLE = HealthStatus.NOT_APPLICABLE, HealthStatus.UNAVAILABLE
Action = HealthAction

# ---------------------------------------------------------------------------- thresholds
MAX_UNCORRECTED_ECC = 0  # volatile uncorrected errors allowed (above the baseline's count)
MAX_ROW_REMAP_UNCORRECTABLE = 512  # rows remapped for uncorrectable errors: WARN at this
MAX_NVLINK_REPLAY = 0  # replay errors allowed since the baseline
MAX_NVLINK_RECOVERY = 0  # recovery (link retraining) errors allowed since the baseline
MAX_NVLINK_CRC_PER_S = 100.0  # CRC flit + data errors per second since the baseline
DEFAULT_MAX_TEMPERATURE_C = 85  # WARN at this when the driver reports no slowdown threshold
DCGM_DIAG_TIMEOUT_S = {1: 300.0, 2: 1200.0, 3: 3600.0, 4: 10800.0}  # per `dcgmi diag -r N`
DCGM_HEALTH_TIMEOUT_S = 60.0  # `dcgmi health -c`

# Clock event (throttle) reasons: these slow the GPU for a reason worth a look ...
SLOWDOWN_REASONS = {
    _nvml.CLOCKS_EVENT_HW_SLOWDOWN: "hw_slowdown",
    _nvml.CLOCKS_EVENT_HW_THERMAL_SLOWDOWN: "hw_thermal_slowdown",
    _nvml.CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN: "hw_power_brake_slowdown",
    _nvml.CLOCKS_EVENT_SW_THERMAL_SLOWDOWN: "sw_thermal_slowdown",
}
# ... these are normal operation (idle, running at the power limit, set clocks).
OTHER_REASONS = {
    _nvml.CLOCKS_EVENT_GPU_IDLE: "gpu_idle",
    _nvml.CLOCKS_EVENT_APPLICATIONS_CLOCKS_SETTING: "applications_clocks_setting",
    _nvml.CLOCKS_EVENT_SW_POWER_CAP: "sw_power_cap",
    _nvml.CLOCKS_EVENT_SYNC_BOOST: "sync_boost",
    _nvml.CLOCKS_EVENT_DISPLAY_CLOCK_SETTING: "display_clock_setting",
}

# XIDs (NVIDIA's XID catalogue). Critical: the GPU or its memory failed -> UNHEALTHY.
CRITICAL_XIDS = {
    48: "double-bit ECC error", 64: "ECC page retirement or row remapping recording failure",
    74: "NVLink error", 79: "GPU has fallen off the bus", 95: "uncontained ECC error",
    119: "GSP RPC timeout", 120: "GSP error", 140: "unrecovered ECC error",
}
# Application: the job's GPU context died, the GPU is not implicated -> restart, not drain.
APPLICATION_XIDS = {
    13: "graphics engine exception", 31: "GPU memory page fault",
    43: "GPU stopped processing", 45: "preemptive cleanup after an earlier error",
    94: "contained ECC error",
}
OTHER_XIDS = {63: "ECC page retirement or row remapping recorded", 92: "high single-bit ECC rate"}

# nvmlDeviceGpuRecoveryAction_t -> (name, status, action)
RECOVERY_ACTIONS = {
    0: ("none", HEALTHY, Action.NONE),
    1: ("gpu_reset", UNHEALTHY, Action.RESET_GPU),
    2: ("node_reboot", UNHEALTHY, Action.REBOOT),
    3: ("drain_p2p", UNHEALTHY, Action.DRAIN),
    4: ("drain_and_reset", UNHEALTHY, Action.RESET_GPU),
    5: ("recover_imex_domain", UNHEALTHY, Action.DRAIN),
    6: ("bus_reset", UNHEALTHY, Action.RESET_GPU),
    7: ("system_reboot", UNHEALTHY, Action.REBOOT),
}

# dcgmErrorSeverity_t -> (name, status, action). JSON prints every one of them as "Fail".
DCGM_SEVERITIES = {
    0: ("none", WARN, Action.MONITOR),
    1: ("monitor", WARN, Action.MONITOR),
    2: ("isolate", UNHEALTHY, Action.DRAIN),
    3: ("unknown", UNHEALTHY, Action.DRAIN),
    4: ("triage", UNHEALTHY, Action.DRAIN),
    5: ("config", WARN, Action.FIX_CONFIG),  # a misconfigured node, not a sick GPU
    6: ("reset", UNHEALTHY, Action.RESET_GPU),
}
# `dcgmi diag` exit statuses that come with results (DCGM_ST_* & 0xff); any other is a
# tool error, whatever it printed.
DCGM_DIAG_EXITS = {0: "OK", 226: "DCGM_ST_NVVS_ERROR: a test reported an error",
                   205: "DCGM_ST_NVVS_ISOLATE_ERROR: a test asks to isolate the GPU"}
DCGM_EXIT_NAMES = {255: "DCGM_ST_BADPARAM", 254: "dcgmi: bad command line",
                   253: "DCGM_ST_GENERIC_ERROR", 250: "DCGM_ST_NOT_SUPPORTED",
                   249: "DCGM_ST_INIT_ERROR", 239: "DCGM_ST_NO_PERMISSION",
                   235: "DCGM_ST_CONNECTION_NOT_VALID: is nv-hostengine running?",
                   217: "DCGM_ST_DIAG_ALREADY_RUNNING", 204: "DCGM_ST_NVVS_BINARY_NOT_FOUND",
                   203: "DCGM_ST_NVVS_KILLED"}

# Runbooks by probe; DCGM results pick theirs by error category or health system.
RUNBOOKS = {
    "gpu": XID_RUNBOOK, "ecc.uncorrected": ECC_RUNBOOK, "retired_pages.pending": ECC_RUNBOOK,
    "remapped_rows": ECC_RUNBOOK, "nvlink.state": NVLINK_RUNBOOK,
    "nvlink.errors": NVLINK_RUNBOOK, "throttle": THROTTLING_RUNBOOK,
    "temperature": THROTTLING_RUNBOOK, "pcie.link": THROTTLING_RUNBOOK,
    "recovery_action": XID_RUNBOOK, "xid": XID_RUNBOOK,
}
DCGM_CATEGORY_RUNBOOKS = {1: THROTTLING_RUNBOOK, 2: THROTTLING_RUNBOOK, 9: THROTTLING_RUNBOOK,
                          10: ECC_RUNBOOK, 11: NVLINK_RUNBOOK, 12: NVLINK_RUNBOOK,
                          13: THROTTLING_RUNBOOK, 14: THROTTLING_RUNBOOK}
DCGM_WORD_RUNBOOKS = (("mem", ECC_RUNBOOK), ("nvlink", NVLINK_RUNBOOK),
                      ("nvswitch", NVLINK_RUNBOOK), ("nvbandwidth", NVLINK_RUNBOOK),
                      ("pcie", THROTTLING_RUNBOOK), ("thermal", THROTTLING_RUNBOOK),
                      ("power", THROTTLING_RUNBOOK), ("stress", THROTTLING_RUNBOOK))


@dataclasses.dataclass(frozen=True)
class Finding:
    """A rule's decision, before it is tied to a GPU."""

    status: HealthStatus
    reason: str
    value: Any = None
    threshold: Any = None
    action: HealthAction = HealthAction.NONE


def result(probe: str, finding: Finding, *, gpu: int | None = None, uuid: str | None = None,
           runbook: str | None = None) -> ProbeResult:
    """``finding`` as the result of ``probe`` on ``gpu``; a WARN or UNHEALTHY reason ends
    by naming its runbook."""
    runbook = runbook or RUNBOOKS.get(probe)
    reason = finding.reason
    if finding.status in (WARN, UNHEALTHY) and runbook and runbook not in reason:
        reason = f"{reason}. See {runbook}"
    return ProbeResult(probe=probe, status=finding.status, value=finding.value,
                       threshold=finding.threshold, reason=reason, gpu=gpu, uuid=uuid,
                       action=finding.action, runbook=runbook)


def nvml_error(error: BaseException) -> Finding:
    """A probe's NVML call raised: not supported is NOT_APPLICABLE, a lost GPU is
    UNHEALTHY, anything else means it could not check."""
    code = _nvml.error_code(error)
    what = _nvml.describe(error)
    if code == _nvml.ERROR_NOT_SUPPORTED:
        return Finding(NOT_APPLICABLE, f"not supported by this GPU or driver ({what})")
    if code == _nvml.ERROR_GPU_IS_LOST:
        return Finding(UNHEALTHY, f"NVML says the GPU is lost ({what}): it fell off the bus",
                       action=Action.REBOOT)
    if code == _nvml.ERROR_RESET_REQUIRED:
        return Finding(UNHEALTHY, f"NVML says the GPU needs a reset ({what})",
                       action=Action.RESET_GPU)
    return Finding(UNAVAILABLE, f"NVML: {what}")


# ---------------------------------------------------------------------------- memory
def ecc(count: int, baseline: int | None) -> Finding:
    """Volatile uncorrected ECC errors (since the driver loaded or the GPU's last reset).
    Without a baseline any is UNHEALTHY; with one, only an increase is, and older ones
    warn."""
    allowed = MAX_UNCORRECTED_ECC + (baseline or 0)
    if count > allowed and baseline is None:
        return Finding(UNHEALTHY, f"{count} uncorrected (double-bit) ECC error(s) since the "
                       "driver loaded or the GPU was last reset: what its memory held may be "
                       "corrupt; drain it and reset the GPU", count, allowed, Action.RESET_GPU)
    if count > allowed:
        return Finding(UNHEALTHY, f"{count - (baseline or 0)} new uncorrected ECC error(s) "
                       f"since the baseline ({baseline} then, {count} now): this run's tensors "
                       "on it may be corrupt; resume elsewhere from a checkpoint taken before "
                       "them, and reset the GPU", count, allowed, Action.RESET_GPU)
    if count > 0:
        return Finding(WARN, f"{count} uncorrected ECC error(s) from before the baseline, none "
                       "since; the GPU has not been reset since them", count, allowed,
                       Action.MONITOR)
    return Finding(HEALTHY, "no uncorrected ECC errors", count, allowed)


def retired_pages(pending: int) -> Finding:
    if pending:
        return Finding(UNHEALTHY, "memory pages are waiting to be retired: until the GPU is "
                       "reset they stay in use", True, False, Action.RESET_GPU)
    return Finding(HEALTHY, "no page retirement pending", False, False)


def remapped_rows(correctable: int, uncorrectable: int, pending: int, failure: int) -> Finding:
    value = {"correctable": correctable, "uncorrectable": uncorrectable,
             "pending": bool(pending), "failure": bool(failure)}
    limit = MAX_ROW_REMAP_UNCORRECTABLE
    if failure:
        return Finding(UNHEALTHY, "row remapping failed: the GPU's memory has no spare rows "
                       "left; the GPU needs replacing", value, limit, Action.DRAIN)
    if pending:
        return Finding(UNHEALTHY, "a row remap is pending: reset the GPU so the bad rows are "
                       "swapped out", value, limit, Action.RESET_GPU)
    if uncorrectable >= limit:
        return Finding(WARN, f"{uncorrectable} rows remapped for uncorrectable errors "
                       f"(DCGM warns at {limit}): the memory is wearing out", value, limit,
                       Action.MONITOR)
    return Finding(HEALTHY, "no row remap pending or failed", value, limit)


# ---------------------------------------------------------------------------- NVLink
def nvlink_state(up: Mapping[int, bool]) -> Finding:
    """``up``: link index -> active, for the links the GPU has."""
    if not up:
        return Finding(NOT_APPLICABLE, "the GPU has no NVLink")
    down = sorted(link for link, active in up.items() if not active)
    value = {"links": len(up), "down": down}
    if len(down) == len(up):
        return Finding(WARN, f"none of its {len(up)} NVLinks is up: expected on a PCIe card "
                       "without a bridge; on an NVLink system every link is down", value, 0,
                       Action.MONITOR)
    if down:
        return Finding(UNHEALTHY, f"NVLink {', '.join(map(str, down))} of {len(up)} down: "
                       "collectives fall back to slower paths or hang", value, 0, Action.DRAIN)
    return Finding(HEALTHY, f"all {len(up)} NVLinks up", value, 0)


def nvlink_errors(now: Mapping[str, int], baseline: Mapping[str, int] | None,
                  seconds: float | None) -> Finding:
    """``now``: counter name (replay, recovery, crc_flit, crc_data) -> total over links."""
    if not now:
        return Finding(NOT_APPLICABLE, "the driver reports no NVLink error counters")
    threshold = {"replay": MAX_NVLINK_REPLAY, "recovery": MAX_NVLINK_RECOVERY,
                 "crc_per_s": MAX_NVLINK_CRC_PER_S}
    if baseline is None:
        return _nvlink_totals(dict(now), threshold)
    grown = {k: v - baseline.get(k, 0) for k, v in now.items()}
    crc = grown.get("crc_flit", 0) + grown.get("crc_data", 0)
    rate = crc / seconds if seconds and seconds > 0 else float(crc)
    value = {"increase": grown, "seconds": seconds}
    critical = {k: grown.get(k, 0) for k in ("replay", "recovery")
                if grown.get(k, 0) > threshold[k]}
    if critical:
        return Finding(UNHEALTHY, f"NVLink {_counts(critical)} error(s) since the baseline: "
                       "links are retraining or replaying", value, threshold, Action.DRAIN)
    if rate >= MAX_NVLINK_CRC_PER_S:
        return Finding(UNHEALTHY, f"{rate:.0f} NVLink CRC errors per second since the "
                       f"baseline (limit {MAX_NVLINK_CRC_PER_S:.0f})", value, threshold,
                       Action.DRAIN)
    if crc:
        return Finding(WARN, f"{crc} NVLink CRC error(s) since the baseline ({rate:.2g}/s, "
                       "below the limit)", value, threshold, Action.MONITOR)
    return Finding(HEALTHY, "no NVLink errors since the baseline", value, threshold)


def _nvlink_totals(now: dict[str, int], threshold: dict[str, Any]) -> Finding:
    bad = {k: now.get(k, 0) for k in ("replay", "recovery") if now.get(k, 0)}
    if bad:
        return Finding(WARN, f"NVLink {_counts(bad)} error(s) since the driver loaded; probe "
                       "with a baseline to see whether they still grow", now, threshold,
                       Action.MONITOR)
    return Finding(HEALTHY, "no NVLink replay or recovery errors since the driver loaded "
                   "(CRC counts are judged as a rate, against a baseline)", now, threshold)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items())


# ---------------------------------------------------------------------------- clocks, heat, PCIe
def throttle(reasons: int) -> Finding:
    """Clock event reasons: a hardware, thermal or power-brake slowdown warns (DCGM:
    "monitor"; one sample cannot tell a passing slowdown from a stuck one)."""
    slow = [name for bit, name in SLOWDOWN_REASONS.items() if reasons & bit]
    other = [name for bit, name in OTHER_REASONS.items() if reasons & bit]
    value, threshold = slow + other, sorted(SLOWDOWN_REASONS.values())
    if slow:
        return Finding(WARN, f"clocks slowed by {', '.join(slow)}: this GPU runs slower than "
                       "its peers and holds every rank back; cooling or power needs a look",
                       value, threshold, Action.MONITOR)
    return Finding(HEALTHY, "no hardware, thermal or power-brake slowdown", value, threshold)


def temperature(celsius: int, slowdown: int | None, shutdown: int | None) -> Finding:
    limit = slowdown if slowdown is not None else DEFAULT_MAX_TEMPERATURE_C
    if shutdown is not None and celsius >= shutdown:
        return Finding(UNHEALTHY, f"{celsius} °C, at or above the shutdown temperature "
                       f"{shutdown} °C", celsius, limit, Action.DRAIN)
    if celsius >= limit:
        return Finding(WARN, f"{celsius} °C, at or above the slowdown temperature {limit} °C",
                       celsius, limit, Action.MONITOR)
    return Finding(HEALTHY, f"{celsius} °C, below {limit} °C", celsius, limit)


def pcie_link(gen: int, max_gen: int, width: int, max_width: int,
              idle: bool | None) -> Finding:
    """Current PCIe generation and width against the most this GPU and slot allow. A
    lower generation is normal while the GPU is idle (it saves power)."""
    value = {"gen": gen, "width": width}
    threshold = {"gen": max_gen, "width": max_width}
    if width < max_width:
        return Finding(WARN, f"PCIe link at x{width} of x{max_width}: transfers to and from "
                       "the host run at a fraction of their bandwidth; reseat the GPU or check "
                       "the riser", value, threshold, Action.FIX_CONFIG)
    if gen < max_gen and idle:
        return Finding(HEALTHY, f"PCIe gen {gen} of {max_gen} while idle (GPUs lower the link "
                       "speed when idle)", value, threshold)
    if gen < max_gen:
        return Finding(WARN, f"PCIe gen {gen} of {max_gen} while the GPU is not idle: the "
                       "link trained slow", value, threshold, Action.MONITOR)
    return Finding(HEALTHY, f"PCIe gen {gen} x{width}, the most this slot allows", value,
                   threshold)


def recovery_action(code: int) -> Finding:
    name, status, action = RECOVERY_ACTIONS.get(
        code, (f"unknown ({code})", UNHEALTHY, Action.DRAIN))
    if status is HEALTHY:
        return Finding(HEALTHY, "the driver asks for no recovery", name, "none")
    return Finding(status, f"the driver asks for recovery: {name}", name, "none", action)


# ---------------------------------------------------------------------------- XIDs
def xids(codes: Sequence[int]) -> Finding:
    """The XIDs seen on one GPU since the listener opened, in order."""
    seen = sorted(set(codes))
    critical = [c for c in seen if c in CRITICAL_XIDS]
    application = [c for c in seen if c in APPLICATION_XIDS]
    other = [c for c in seen if c not in CRITICAL_XIDS and c not in APPLICATION_XIDS]
    named = "; ".join(f"XID {c} ({_xid_name(c)})" for c in seen)
    if critical:
        return Finding(UNHEALTHY, f"{named}: the GPU failed; take the node out and follow the "
                       "runbook for each XID", seen, [], Action.DRAIN)
    if application:
        return Finding(WARN, f"{named}: the job's GPU context died; restart from a checkpoint "
                       "(the GPU is not implicated)", seen, [], Action.RESTART)
    if other:
        return Finding(WARN, f"{named}: not a failure on hardtrain's lists; look it up",
                       seen, [], Action.MONITOR)
    return Finding(HEALTHY, "no XID since the listener opened", seen, [])


def _xid_name(code: int) -> str:
    return (CRITICAL_XIDS.get(code) or APPLICATION_XIDS.get(code) or OTHER_XIDS.get(code)
            or "not in hardtrain's tables")


# ---------------------------------------------------------------------------- DCGM
def dcgm_warning(severity: int | None, printed: str) -> tuple[HealthStatus, HealthAction, str]:
    """One warning of a ``dcgmi diag`` result, by its ``error_severity``. Without one (DCGM
    2.x) a "Fail" counts as UNHEALTHY: nothing says it is milder."""
    if severity is None:
        return (UNHEALTHY, Action.DRAIN, "severity not reported") if printed != "Warn" \
            else (WARN, Action.MONITOR, "severity not reported")
    name, status, action = DCGM_SEVERITIES.get(severity, (str(severity), UNHEALTHY,
                                                           Action.DRAIN))
    return status, action, f"severity {severity} ({name})"


def dcgm_status(printed: str) -> tuple[HealthStatus, HealthAction] | None:
    """A diag result without warnings, by what dcgmi printed; None: not a known status."""
    return {"Pass": (HEALTHY, Action.NONE), "Skip": (NOT_APPLICABLE, Action.NONE),
            "Not Run": (NOT_APPLICABLE, Action.NONE), "Warn": (WARN, Action.MONITOR),
            "Fail": (UNHEALTHY, Action.DRAIN)}.get(printed)


def dcgm_health(printed: str) -> tuple[HealthStatus, HealthAction]:
    """``dcgmi health -c``'s words for a GPU or the whole group."""
    return {"Healthy": (HEALTHY, Action.NONE), "Warning": (WARN, Action.MONITOR),
            "Failure": (UNHEALTHY, Action.DRAIN)}.get(printed, (UNAVAILABLE, Action.NONE))


def dcgm_runbook(categories: Sequence[int], *names: str) -> str:
    """The runbook for a DCGM finding: by its error category, else by words in the test or
    health-system name; driver, software and configuration findings go to the XID one."""
    for category in categories:
        if category in DCGM_CATEGORY_RUNBOOKS:
            return DCGM_CATEGORY_RUNBOOKS[category]
    if not categories:
        text = " ".join(names).lower()
        for word, runbook in DCGM_WORD_RUNBOOKS:
            if word in text:
                return runbook
    return XID_RUNBOOK


def dcgm_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    name = DCGM_DIAG_EXITS.get(code) or DCGM_EXIT_NAMES.get(code)
    return f"exit status {code}" + (f" ({name})" if name else "")
