"""dcgmi through a fake on PATH replaying real and synthetic outputs: verdicts from each
warning's severity, both JSON trees, tool errors (exit codes, text, a hang) UNAVAILABLE."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hardtrain import health
from hardtrain.health import HealthAction, HealthReport, HealthStatus, ProbeResult
from tests.health.fakes import FakeNVML, Reply, fake_dcgmi, h100, no_dcgmi

HEALTHY, WARN, UNHEALTHY = HealthStatus.HEALTHY, HealthStatus.WARN, HealthStatus.UNHEALTHY
NOT_APPLICABLE, UNAVAILABLE = HealthStatus.NOT_APPLICABLE, HealthStatus.UNAVAILABLE

GB10_R1 = "dcgmi_diag_r1_json_dcgm4.2.3_gb10.json"
GB10_SKIP = "dcgmi_diag_r2_json_dcgm4.2.3_gb10_partial_skip.json"
GB10_GATED = "dcgmi_diag_r2_json_dcgm4.5.2_gb10_gated_exit226.json"
GB10_ALLOWED = "dcgmi_diag_r2_json_dcgm4.5.2_gb10_allowed_exit226.json"
TEXT_PASS = "dcgmi_diag_r2_text_dcgm4.4.2_pass.txt"
PASS = "synthetic_dcgmi_diag_r1_json_dcgm4x_pass_exit0.json"


def diag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, code: int,
         level: int = 2) -> HealthReport:
    fake_dcgmi(tmp_path, monkeypatch, diag=Reply(fixture, code))
    return health.probe(nvml=FakeNVML([h100(0), h100(1)]), dcgm_level=level)


def dcgm(report: HealthReport) -> dict[tuple[str, int | None], ProbeResult]:
    return {(r.probe, r.gpu): r for r in report.results if r.probe.startswith("dcgm.")}


def test_a_config_warning_printed_as_fail_is_a_misconfigured_node_not_a_sick_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = diag(tmp_path, monkeypatch, GB10_R1, 226, level=1)
    (software,) = dcgm(report).values()
    assert (software.probe, software.gpu, software.uuid) == (
        "dcgm.diag.software", 0, "GPU-00000000-1111-2222-3333-444444444444")
    assert (software.status, software.action, software.value) == (
        WARN, HealthAction.FIX_CONFIG, "Fail")
    assert "Persistence mode for GPU 0 is disabled" in software.reason
    assert "(error 29, severity 5 (config))" in software.reason
    assert software.reason.endswith("See runbooks/xid-errors.md")
    assert report.verdict is WARN  # 226 comes with a finding: not a tool error


def test_skipped_tests_are_not_applicable_and_passed_ones_healthy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for fixture in (GB10_SKIP, GB10_GATED):
        got = dcgm(diag(tmp_path, monkeypatch, fixture, 226))
        assert got["dcgm.diag.software", 0].status is WARN
        assert got["dcgm.diag.memory", 0].status is NOT_APPLICABLE
        assert got["dcgm.diag.pcie", 0].status is NOT_APPLICABLE
        assert "skipped by dcgmi" in got["dcgm.diag.pcie", 0].reason
    allowed = dcgm(diag(tmp_path, monkeypatch, GB10_ALLOWED, 226))
    assert allowed["dcgm.diag.memory", 0].status is HEALTHY
    assert allowed["dcgm.diag.pcie", 0].status is HEALTHY
    assert len(allowed) == 3  # test_summary's copy of the warning is not counted twice


def test_all_pass_is_healthy_and_the_command_line_is_dcgmi_diag_r_level_j(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_dcgmi(tmp_path, monkeypatch, diag=Reply(PASS, 0))
    report = health.probe(nvml=FakeNVML([h100(0), h100(1)]), dcgm_level=3)
    assert calls.read_text() == "diag -r 3 -j\n"
    got = dcgm(report)
    assert {k: r.status for k, r in got.items()} == {("dcgm.diag.software", 0): HEALTHY,
                                                     ("dcgm.diag.software", 1): HEALTHY}
    assert report.verdict is HEALTHY


def test_isolate_reset_and_monitor_severities(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    isolate = dcgm(diag(tmp_path, monkeypatch,
                        "synthetic_dcgmi_diag_r2_json_dcgm4x_isolate_exit205.json", 205))
    memory = isolate["dcgm.diag.memory", 0]
    assert (memory.status, memory.action) == (UNHEALTHY, HealthAction.DRAIN)
    assert "severity 2 (isolate)" in memory.reason and "ecc-errors.md" in memory.reason
    assert isolate["dcgm.diag.memory", 1].status is HEALTHY
    mixed = dcgm(diag(tmp_path, monkeypatch,
                      "synthetic_dcgmi_diag_r2_json_dcgm4x_reset_monitor_exit226.json", 226))
    reset = mixed["dcgm.diag.memory", 0]
    assert (reset.status, reset.action) == (UNHEALTHY, HealthAction.RESET_GPU)
    monitor = mixed["dcgm.diag.pcie", 1]
    assert (monitor.status, monitor.action) == (WARN, HealthAction.MONITOR)
    assert "gpu-throttling.md" in monitor.reason  # category 9: thermal


def test_the_dcgm_3x_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = diag(tmp_path, monkeypatch,
                  "synthetic_dcgmi_diag_r2_json_dcgm3x_isolate_exit205.json", 205)
    got = dcgm(report)
    assert got["dcgm.diag.gpu_memory", 0].status is UNHEALTHY  # a null hole is skipped
    assert got["dcgm.diag.gpu_memory", 1].status is HEALTHY
    persistence = got["dcgm.diag.persistence_mode", 1]  # 3.x's "warnings" key in a warning
    assert persistence.status is WARN and "Persistence mode for GPU 1" in persistence.reason
    assert got["dcgm.diag.denylist", None].status is HEALTHY  # no GPU: the host
    assert report.verdict is UNHEALTHY


def test_the_dcgm_2x_tree_has_no_severity_so_a_fail_is_unhealthy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = dcgm(diag(tmp_path, monkeypatch,
                    "synthetic_dcgmi_diag_r2_json_dcgm2x_fail_exit226.json", 226))
    pcie = got["dcgm.diag.pcie", 1]
    assert pcie.status is UNHEALTHY and "severity not reported" in pcie.reason
    assert "bandwidth 3.05 GB/s" in pcie.reason and "gpu-throttling.md" in pcie.reason
    assert got["dcgm.diag.pcie", 0].status is HEALTHY
    assert got["dcgm.diag.blacklist", None].status is HEALTHY


@pytest.mark.parametrize(("fixture", "code", "says"), [
    (TEXT_PASS, 0, "not JSON: 'Successfully ran diagnostic for group.'"),
    ("synthetic_dcgmi_diag_json_runtime_error_exit253.json", 253,
     "exit status 253 (DCGM_ST_GENERIC_ERROR): runtime error: Error: Diagnostic could not "
     "be run while DCGM is paused."),
    (PASS, 253, "exit status 253 (DCGM_ST_GENERIC_ERROR): a tool error, whatever it printed"),
    (PASS, 226, "but its JSON shows no failure"),
    ("synthetic_dcgmi_health_json_healthy.json", 0, "neither \"DCGM Diagnostic\""),
])
def test_tool_errors_are_unavailable_never_a_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, code: int,
        says: str) -> None:
    report = diag(tmp_path, monkeypatch, fixture, code)
    error = dcgm(report)["dcgm.diag", None]
    assert error.status is UNAVAILABLE and says in error.reason, error.reason
    assert report.verdict is UNAVAILABLE


def test_missing_dcgmi_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_dcgmi(tmp_path, monkeypatch)
    report = health.probe(nvml=FakeNVML([h100(0)]), dcgm_level=1, dcgm_health=True)
    got = dcgm(report)
    assert set(got) == {("dcgm.diag", None), ("dcgm.health", None)}
    for result in got.values():
        assert result.status is UNAVAILABLE
        assert result.reason == "dcgmi not found on PATH: DCGM is not installed here, or " \
            "not on PATH"
    assert report.verdict is UNAVAILABLE


def test_a_hanging_dcgmi_is_cut_off_and_reported(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dcgmi(tmp_path, monkeypatch, diag=Reply(hang=True), health=Reply(hang=True))
    started = time.monotonic()
    report = health.probe(nvml=FakeNVML([h100(0)]), dcgm_level=1, dcgm_health=True,
                          timeout_s=0.5)
    assert time.monotonic() - started < 60  # the script sleeps 600 s
    got = dcgm(report)
    assert "`dcgmi diag -r 1 -j` did not finish within 0.5 s" in got["dcgm.diag", None].reason
    assert "`dcgmi health -c -j` did not finish" in got["dcgm.health", None].reason
    assert report.verdict is UNAVAILABLE


def test_dcgmi_health(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_dcgmi(tmp_path, monkeypatch,
                       health=Reply("synthetic_dcgmi_health_json_healthy.json", 0))
    nvml = FakeNVML([h100(0), h100(1)])
    healthy = health.probe(nvml=nvml, dcgm_health=True)
    assert calls.read_text() == "health -c -j\n"
    assert dcgm(healthy)["dcgm.health", None].status is HEALTHY
    assert healthy.verdict is HEALTHY
    fake_dcgmi(tmp_path, monkeypatch, health=Reply("synthetic_dcgmi_health_json_failure.json"))
    failing = dcgm(health.probe(nvml=nvml, dcgm_health=True))
    overall, gpu1 = failing["dcgm.health", None], failing["dcgm.health", 1]
    assert overall.status is UNHEALTHY and "ecc-errors.md" in overall.reason
    assert (gpu1.status, gpu1.uuid) == (UNHEALTHY, nvml.gpus[1].uuid)
    assert "Memory system: Failure: Detected 2 volatile double-bit ECC error(s) in GPU 1." \
        in gpu1.reason
    fake_dcgmi(tmp_path, monkeypatch, health=Reply(
        "synthetic_dcgmi_health_text_watches_not_enabled_exit253.txt", 253))
    (unwatched,) = dcgm(health.probe(nvml=nvml, dcgm_health=True)).values()
    assert unwatched.status is UNAVAILABLE
    assert "Health watches not enabled" in unwatched.reason
    assert "exit status 253" in unwatched.reason


def test_dcgm_results_of_gpus_not_asked_for_are_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dcgmi(tmp_path, monkeypatch, diag=Reply(PASS, 0))
    report = health.probe(nvml=FakeNVML([h100(0), h100(1)]), dcgm_level=1, gpus=[1])
    assert {r.gpu for r in report.results} == {1}
