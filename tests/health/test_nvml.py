"""The NVML probes, through a fake NVML that follows pynvml: each failure class gives its
verdict; NotSupported is NOT_APPLICABLE; a missing NVML is UNAVAILABLE; never healthy
unchecked."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import pynvml
import pytest

import hardtrain as ht
from hardtrain import _nvml, health
from hardtrain.health import HealthAction, HealthReport, HealthStatus, ProbeResult
from tests.health.fakes import (
    FUNCTION_NOT_FOUND,
    GPU_IS_LOST,
    NO_PERMISSION,
    NOT_SUPPORTED,
    FakeGpu,
    FakeNVML,
    Raises,
    h100,
    rtx4090,
)

HEALTHY, WARN, UNHEALTHY = HealthStatus.HEALTHY, HealthStatus.WARN, HealthStatus.UNHEALTHY
NOT_APPLICABLE, UNAVAILABLE = HealthStatus.NOT_APPLICABLE, HealthStatus.UNAVAILABLE


def results(report: HealthReport, gpu: int | None = 0) -> dict[str, ProbeResult]:
    return {r.probe: r for r in report.results if r.gpu == gpu}


def one(gpu: FakeGpu, **kwargs: Any) -> dict[str, ProbeResult]:
    return results(health.probe(nvml=FakeNVML([gpu]), **kwargs))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_healthy_h100_passes_every_probe_it_has() -> None:
    nvml = FakeNVML([h100(0), h100(1)])
    report = health.probe(nvml=nvml)
    assert report.verdict is HEALTHY and report.action is HealthAction.NONE
    assert nvml.num_inits == nvml.num_shutdowns == 1
    for index in (0, 1):
        got = results(report, index)
        assert set(got) == {"ecc.uncorrected", "retired_pages.pending", "remapped_rows",
                            "nvlink.state", "nvlink.errors", "throttle", "temperature",
                            "pcie.link", "recovery_action"}
        assert got["retired_pages.pending"].status is NOT_APPLICABLE  # Hopper remaps rows
        assert {p for p, r in got.items() if r.status is HEALTHY} == set(got) - {
            "retired_pages.pending"}
        assert all(r.uuid == f"GPU-{index:08d}-1111-2222-3333-444444444444"
                   for r in got.values())
    assert results(report)["nvlink.state"].value == {"links": 18, "down": []}
    assert results(report)["temperature"].value == 45
    assert results(report)["temperature"].threshold == 87
    assert report.host and report.checked_at > 0


def test_uncorrected_ecc_errors_are_unhealthy_and_name_the_runbook() -> None:
    report = health.probe(nvml=FakeNVML([h100(0), h100(1, ecc_uncorrected=2)]))
    ecc = results(report, 1)["ecc.uncorrected"]
    assert (ecc.status, ecc.value, ecc.threshold) == (UNHEALTHY, 2, 0)
    assert ecc.action is HealthAction.RESET_GPU
    assert ecc.reason.endswith("See runbooks/ecc-errors.md")
    assert report.verdict is UNHEALTHY and report.problems() == [ecc]
    with pytest.raises(ht.UnhealthyDeviceError) as caught:
        report.raise_for_status()
    error = caught.value
    assert isinstance(error, ht.HardtrainError)
    assert (error.gpu, error.uuid, error.probe, error.value) == (
        1, "GPU-00000001-1111-2222-3333-444444444444", "ecc.uncorrected", 2)
    assert error.runbook == "runbooks/ecc-errors.md" and error.report is report
    message = str(error)
    for part in ("GPU 1", "GPU-00000001", "ecc.uncorrected", "value 2", "threshold 0",
                 "runbooks/ecc-errors.md"):
        assert part in message, message


def test_ecc_against_a_baseline_only_new_errors_are_unhealthy() -> None:
    gpu = h100(0, ecc_uncorrected=1)
    nvml = FakeNVML([gpu])
    baseline = health.take_baseline(nvml=nvml)
    assert baseline.gpus[gpu.uuid].ecc_uncorrected == 1
    old = results(health.probe(baseline, nvml=nvml))["ecc.uncorrected"]
    assert (old.status, old.value, old.threshold, old.action) == (WARN, 1, 1,
                                                                  HealthAction.MONITOR)
    gpu.ecc_uncorrected = 3
    new = results(health.probe(baseline, nvml=nvml))["ecc.uncorrected"]
    assert (new.status, new.value, new.threshold) == (UNHEALTHY, 3, 1)
    assert "2 new uncorrected ECC error(s) since the baseline" in new.reason
    assert nvml.num_inits == nvml.num_shutdowns == 3


def test_pending_page_retirement_and_row_remapping() -> None:
    volta = results(health.probe(nvml=FakeNVML([h100(0, retired_pending=1)])))
    assert volta["retired_pages.pending"].status is UNHEALTHY
    assert "runbooks/ecc-errors.md" in volta["retired_pages.pending"].reason
    pending = one(h100(0, remapped_rows=(0, 1, 1, 0)))["remapped_rows"]
    assert (pending.status, pending.action) == (UNHEALTHY, HealthAction.RESET_GPU)
    assert pending.value == {"correctable": 0, "uncorrectable": 1, "pending": True,
                             "failure": False}
    failed = one(h100(0, remapped_rows=(3, 9, 0, 1)))["remapped_rows"]
    assert (failed.status, failed.action) == (UNHEALTHY, HealthAction.DRAIN)
    worn = one(h100(0, remapped_rows=(0, 512, 0, 0)))["remapped_rows"]
    assert (worn.status, worn.threshold) == (WARN, 512)
    assert one(h100(0, remapped_rows=(0, 511, 0, 0)))["remapped_rows"].status is HEALTHY


def test_a_downed_nvlink_is_unhealthy_none_up_warns_none_there_is_not_applicable() -> None:
    links = [1] * 18
    links[3] = links[7] = 0
    down = one(h100(0, nvlinks=links))["nvlink.state"]
    assert (down.status, down.value, down.action) == (
        UNHEALTHY, {"links": 18, "down": [3, 7]}, HealthAction.DRAIN)
    assert "NVLink 3, 7 of 18 down" in down.reason and "nvlink-degraded.md" in down.reason
    assert one(h100(0, nvlinks=[0] * 12))["nvlink.state"].status is WARN
    got = one(rtx4090(0))
    assert got["nvlink.state"].status is NOT_APPLICABLE
    assert got["nvlink.errors"].status is NOT_APPLICABLE


def test_nvlink_error_counters_totals_and_growth_since_a_baseline() -> None:
    replay, recovery = pynvml.NVML_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY
    crc = pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT
    gpu = h100(0, nvlink_errors={(2, replay): 4, (5, crc): 10})
    nvml, clock = FakeNVML([gpu]), Clock()
    totals = results(health.probe(nvml=nvml))["nvlink.errors"]
    assert totals.status is WARN and totals.value == {"replay": 4, "recovery": 0,
                                                      "crc_flit": 10, "crc_data": 0}
    baseline = health.take_baseline(nvml=nvml, clock=clock)
    clock.now += 10.0
    calm = results(health.probe(baseline, nvml=nvml, clock=clock))["nvlink.errors"]
    assert calm.status is HEALTHY and calm.value["seconds"] == 10.0
    gpu.nvlink_errors[(5, crc)] = 60  # 50 in 10 s: below 100/s
    assert results(health.probe(baseline, nvml=nvml, clock=clock))[
        "nvlink.errors"].status is WARN
    gpu.nvlink_errors[(5, crc)] = 10 + 1000 * 10  # 1000/s
    storm = results(health.probe(baseline, nvml=nvml, clock=clock))["nvlink.errors"]
    assert storm.status is UNHEALTHY and "1000 NVLink CRC errors per second" in storm.reason
    gpu.nvlink_errors = {(2, replay): 4, (5, crc): 10, (0, recovery): 1}
    retrain = results(health.probe(baseline, nvml=nvml, clock=clock))["nvlink.errors"]
    assert retrain.status is UNHEALTHY and "1 recovery" in retrain.reason


def test_clock_slowdowns_warn_and_normal_limits_do_not() -> None:
    hw = pynvml.nvmlClocksEventReasonHwSlowdown | pynvml.nvmlClocksEventReasonSwPowerCap
    slow = one(h100(0, clock_reasons=hw))["throttle"]
    assert slow.status is WARN and slow.value == ["hw_slowdown", "sw_power_cap"]
    assert "gpu-throttling.md" in slow.reason
    brake = pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown
    assert one(h100(0, clock_reasons=brake))["throttle"].status is WARN
    thermal = pynvml.nvmlClocksEventReasonSwThermalSlowdown
    assert one(h100(0, clock_reasons=thermal))["throttle"].status is WARN
    capped = one(h100(0, clock_reasons=pynvml.nvmlClocksEventReasonSwPowerCap))["throttle"]
    assert capped.status is HEALTHY and capped.value == ["sw_power_cap"]
    old = one(h100(0, old_driver=True, clock_reasons=hw))["throttle"]  # ...ThrottleReasons
    assert old.status is WARN and old.value == ["hw_slowdown", "sw_power_cap"]


def test_temperature_against_the_drivers_thresholds() -> None:
    assert one(h100(0, temperature=87))["temperature"].status is WARN
    hot = one(h100(0, temperature=93))["temperature"]
    assert (hot.status, hot.action) == (UNHEALTHY, HealthAction.DRAIN)
    fallback = one(h100(0, temperature=85, slowdown_c=Raises(NOT_SUPPORTED),
                        shutdown_c=Raises(NOT_SUPPORTED)))["temperature"]
    assert (fallback.status, fallback.threshold) == (WARN, 85)


def test_pcie_link_width_and_generation() -> None:
    narrow = one(h100(0, pcie=(5, 5, 8, 16)))["pcie.link"]
    assert (narrow.status, narrow.action) == (WARN, HealthAction.FIX_CONFIG)
    assert narrow.value == {"gen": 5, "width": 8}
    assert narrow.threshold == {"gen": 5, "width": 16}
    idle = pynvml.nvmlClocksEventReasonGpuIdle
    assert one(h100(0, pcie=(1, 5, 16, 16), clock_reasons=idle))["pcie.link"].status \
        is HEALTHY
    assert one(h100(0, pcie=(3, 5, 16, 16)))["pcie.link"].status is WARN


def test_the_drivers_recovery_action() -> None:
    reboot = one(h100(0, recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT))
    assert (reboot["recovery_action"].status, reboot["recovery_action"].value,
            reboot["recovery_action"].action) == (UNHEALTHY, "node_reboot", HealthAction.REBOOT)
    reset = one(h100(0, recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET))
    assert reset["recovery_action"].action is HealthAction.RESET_GPU
    old = one(h100(0, recovery_return=pynvml.NVML_ERROR_INVALID_ARGUMENT))
    assert old["recovery_action"].status is NOT_APPLICABLE


def test_not_supported_is_not_applicable_never_healthy() -> None:
    report = health.probe(nvml=FakeNVML([rtx4090(0)]))
    got = results(report)
    for probe in ("ecc.uncorrected", "retired_pages.pending", "remapped_rows",
                  "nvlink.state", "nvlink.errors", "recovery_action"):
        assert got[probe].status is NOT_APPLICABLE, probe
        assert got[probe].status is not HEALTHY
    assert "NVMLError_NotSupported" in got["ecc.uncorrected"].reason
    assert report.verdict is HEALTHY  # what it has (clocks, heat, PCIe) was checked


def test_an_nvml_error_is_unavailable_and_so_is_the_verdict() -> None:
    report = health.probe(nvml=FakeNVML([h100(0, ecc_uncorrected=Raises(NO_PERMISSION))]))
    ecc = results(report)["ecc.uncorrected"]
    assert ecc.status is UNAVAILABLE and "NVMLError_NoPermission" in ecc.reason
    assert report.verdict is UNAVAILABLE
    with pytest.raises(ht.UnhealthyDeviceError, match="could not be checked"):
        report.raise_for_status()
    report.raise_for_status(allow_unavailable=True)


def test_a_lost_gpu_is_unhealthy() -> None:
    report = health.probe(nvml=FakeNVML([h100(0), h100(1, handle=Raises(GPU_IS_LOST))]))
    lost = results(report, 1)
    assert set(lost) == {"gpu"}
    assert (lost["gpu"].status, lost["gpu"].action) == (UNHEALTHY, HealthAction.REBOOT)
    assert "fell off the bus" in lost["gpu"].reason and "xid-errors.md" in lost["gpu"].reason
    mid = one(h100(0, temperature=Raises(GPU_IS_LOST)))["temperature"]
    assert mid.status is UNHEALTHY


def test_missing_nvml_is_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    no_driver = FakeNVML([], init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    report = health.probe(nvml=no_driver)
    (only,) = report.results
    assert (only.probe, only.gpu, only.status) == ("nvml", None, UNAVAILABLE)
    assert only.reason == "NVML: NVMLError_LibraryNotFound: NVML Shared Library Not Found"
    assert report.verdict is UNAVAILABLE
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    (missing,) = health.probe().results
    assert missing.status is UNAVAILABLE and "pynvml is not installed" in missing.reason
    assert health.take_baseline().gpus == {}


def test_no_gpu_at_all_and_a_missing_index_are_unavailable() -> None:
    assert health.probe(nvml=FakeNVML([])).verdict is UNAVAILABLE
    report = health.probe(nvml=FakeNVML([h100(0), h100(1)]), gpus=[1, 5])
    assert {r.gpu for r in report.results} == {1, None}
    (missing,) = report.with_status(UNAVAILABLE)
    assert "no GPU with NVML index [5]" in missing.reason


def test_a_report_round_trips_through_json() -> None:
    gpus = [h100(0, ecc_uncorrected=1, clock_reasons=pynvml.nvmlClocksEventReasonHwSlowdown),
            rtx4090(1, temperature=Raises(NO_PERMISSION))]
    report = health.probe(nvml=FakeNVML(gpus))
    text = json.dumps(report.to_json())
    back = HealthReport.from_json(json.loads(text))
    assert back == report
    assert back.verdict is report.verdict is UNHEALTHY
    assert json.loads(text)["verdict"] == "unhealthy"
    with pytest.raises(ValueError, match="unknown keys"):
        ProbeResult.from_json({**report.results[0].to_json(), "extra": 1})


def test_one_nvml_seam_serves_metadata_and_health() -> None:
    nvml = FakeNVML([h100(0), rtx4090(1)])
    gpus = ht.capture_metadata(nvml=nvml)["hardware"]["gpus"]
    assert [d["uuid"] for d in gpus["devices"]] == [g.uuid for g in nvml.gpus]
    assert gpus["devices"][1]["ecc_mode"] == "unavailable: NVMLError_NotSupported"
    report = health.probe(nvml=nvml)
    assert {r.uuid for r in report.results} == {g.uuid for g in nvml.gpus}
    assert nvml.num_inits == nvml.num_shutdowns == 2


def test_the_seams_constants_are_pynvmls() -> None:
    pairs = {
        "ERROR_INVALID_ARGUMENT": "NVML_ERROR_INVALID_ARGUMENT",
        "ERROR_NOT_SUPPORTED": "NVML_ERROR_NOT_SUPPORTED", "ERROR_TIMEOUT": "NVML_ERROR_TIMEOUT",
        "ERROR_FUNCTION_NOT_FOUND": "NVML_ERROR_FUNCTION_NOT_FOUND",
        "ERROR_GPU_IS_LOST": "NVML_ERROR_GPU_IS_LOST",
        "ERROR_RESET_REQUIRED": "NVML_ERROR_RESET_REQUIRED",
        "MEMORY_ERROR_TYPE_UNCORRECTED": "NVML_MEMORY_ERROR_TYPE_UNCORRECTED",
        "VOLATILE_ECC": "NVML_VOLATILE_ECC", "TEMPERATURE_GPU": "NVML_TEMPERATURE_GPU",
        "TEMPERATURE_THRESHOLD_SHUTDOWN": "NVML_TEMPERATURE_THRESHOLD_SHUTDOWN",
        "TEMPERATURE_THRESHOLD_SLOWDOWN": "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN",
        "NVLINK_MAX_LINKS": "NVML_NVLINK_MAX_LINKS",
        "NVLINK_ERROR_DL_REPLAY": "NVML_NVLINK_ERROR_DL_REPLAY",
        "NVLINK_ERROR_DL_RECOVERY": "NVML_NVLINK_ERROR_DL_RECOVERY",
        "NVLINK_ERROR_DL_CRC_FLIT": "NVML_NVLINK_ERROR_DL_CRC_FLIT",
        "NVLINK_ERROR_DL_CRC_DATA": "NVML_NVLINK_ERROR_DL_CRC_DATA",
        "FI_DEV_GET_GPU_RECOVERY_ACTION": "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION",
        "EVENT_TYPE_XID_CRITICAL_ERROR": "nvmlEventTypeXidCriticalError",
        "CLOCKS_EVENT_GPU_IDLE": "nvmlClocksEventReasonGpuIdle",
        "CLOCKS_EVENT_APPLICATIONS_CLOCKS_SETTING":
            "nvmlClocksEventReasonApplicationsClocksSetting",
        "CLOCKS_EVENT_SW_POWER_CAP": "nvmlClocksEventReasonSwPowerCap",
        "CLOCKS_EVENT_HW_SLOWDOWN": "nvmlClocksEventReasonHwSlowdown",
        "CLOCKS_EVENT_SYNC_BOOST": "nvmlClocksEventReasonSyncBoost",
        "CLOCKS_EVENT_SW_THERMAL_SLOWDOWN": "nvmlClocksEventReasonSwThermalSlowdown",
        "CLOCKS_EVENT_HW_THERMAL_SLOWDOWN": "nvmlClocksEventReasonHwThermalSlowdown",
        "CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN": "nvmlClocksEventReasonHwPowerBrakeSlowdown",
        "CLOCKS_EVENT_DISPLAY_CLOCK_SETTING": "nvmlClocksEventReasonDisplayClockSetting",
    }
    for ours, theirs in pairs.items():
        assert getattr(_nvml, ours) == getattr(pynvml, theirs), ours
    assert pynvml.nvmlClocksThrottleReasonHwSlowdown == _nvml.CLOCKS_EVENT_HW_SLOWDOWN
    assert isinstance(pynvml.NVMLError(FUNCTION_NOT_FOUND), pynvml.NVMLError_FunctionNotFound)


def test_a_background_thread_can_probe() -> None:
    nvml = FakeNVML([h100(0)])
    baseline = health.take_baseline(nvml=nvml)
    reports: list[HealthReport] = []
    thread = threading.Thread(target=lambda: reports.append(health.probe(baseline, nvml=nvml)))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and reports[0].verdict is HEALTHY


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="dcgm_level=5: must be 1, 2, 3 or 4"):
        health.probe(nvml=FakeNVML([h100(0)]), dcgm_level=5)
    with pytest.raises(ValueError, match="timeout_s=0"):
        health.probe(nvml=FakeNVML([h100(0)]), dcgm_level=1, timeout_s=0)


def test_every_warning_and_failure_names_an_existing_runbook() -> None:
    root = Path(__file__).resolve().parents[2]
    sick = h100(0, ecc_uncorrected=1, retired_pending=1, remapped_rows=(0, 600, 1, 0),
                nvlinks=[1, 0] * 9, nvlink_errors={(0, pynvml.NVML_NVLINK_ERROR_DL_REPLAY): 2},
                clock_reasons=pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
                temperature=99, pcie=(3, 5, 8, 16),
                recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET)
    nvml = FakeNVML([sick, h100(1, handle=Raises(GPU_IS_LOST))])
    with health.XidListener(nvml=nvml) as xids:
        nvml.xid(0, 13)
        report = health.probe(xids=xids, nvml=nvml)
    problems = report.problems()
    assert {r.probe for r in problems} == {
        "ecc.uncorrected", "retired_pages.pending", "remapped_rows", "nvlink.state",
        "nvlink.errors", "throttle", "temperature", "pcie.link", "recovery_action", "xid",
        "gpu"}
    for result in problems:
        assert result.runbook and f"See {result.runbook}" in result.reason, result
        assert (root / result.runbook).is_file(), result.runbook
