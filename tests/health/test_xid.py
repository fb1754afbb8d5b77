"""The XID listener: NVML event sets through the fake; critical XIDs fail, application
XIDs ask for a restart, a GPU that cannot listen says so."""

from __future__ import annotations

import threading

import pynvml

from hardtrain import health
from hardtrain.health import HealthAction, HealthStatus, ProbeResult
from tests.health.fakes import NOT_SUPPORTED, FakeNVML, Raises, h100

HEALTHY, WARN, UNHEALTHY = HealthStatus.HEALTHY, HealthStatus.WARN, HealthStatus.UNHEALTHY


def xid_results(nvml: FakeNVML, listener: health.XidListener) -> dict[int | None, ProbeResult]:
    report = health.probe(xids=listener, nvml=nvml)
    return {r.gpu: r for r in report.results if r.probe == "xid"}


def test_a_critical_xid_makes_its_gpu_unhealthy() -> None:
    nvml = FakeNVML([h100(0), h100(1)])
    with health.XidListener(nvml=nvml) as listener:
        assert xid_results(nvml, listener)[1].status is HEALTHY
        nvml.xid(1, 79)
        got = xid_results(nvml, listener)
        assert got[0].status is HEALTHY and got[0].value == []
        assert (got[1].status, got[1].value, got[1].action) == (UNHEALTHY, [79],
                                                                HealthAction.DRAIN)
        assert "XID 79 (GPU has fallen off the bus)" in got[1].reason
        assert got[1].reason.endswith("See runbooks/xid-errors.md")
        (event,) = listener.events
        assert (event.xid, event.gpu, event.uuid) == (79, 1, nvml.gpus[1].uuid)
        assert xid_results(nvml, listener)[1].status is UNHEALTHY  # it is not forgotten
    assert nvml.event_sets[0].freed and nvml.num_inits == nvml.num_shutdowns


def test_every_critical_xid_fails() -> None:
    nvml = FakeNVML([h100(0)])
    for code in (48, 64, 74, 79, 95, 119, 120, 140):
        with health.XidListener(nvml=nvml) as listener:
            nvml.xid(0, code)
            assert xid_results(nvml, listener)[0].status is UNHEALTHY, code


def test_application_xids_ask_for_a_restart_not_a_drain() -> None:
    nvml = FakeNVML([h100(0)])
    for code in (13, 31, 43):
        with health.XidListener(nvml=nvml) as listener:
            nvml.xid(0, code)
            got = xid_results(nvml, listener)[0]
            assert (got.status, got.action) == (WARN, HealthAction.RESTART), code
            assert "restart from a checkpoint" in got.reason


def test_an_unknown_xid_warns() -> None:
    nvml = FakeNVML([h100(0)])
    with health.XidListener(nvml=nvml) as listener:
        nvml.xid(0, 1234)
        got = xid_results(nvml, listener)[0]
        assert (got.status, got.action) == (WARN, HealthAction.MONITOR)
        assert "XID 1234 (not in hardtrain's tables)" in got.reason


def test_a_gpu_that_cannot_listen_is_not_applicable_and_no_nvml_is_unavailable() -> None:
    nvml = FakeNVML([h100(0), h100(1, events=Raises(NOT_SUPPORTED))])
    with health.XidListener(nvml=nvml) as listener:
        got = xid_results(nvml, listener)
        assert got[0].status is HEALTHY
        assert got[1].status is HealthStatus.NOT_APPLICABLE
    missing = FakeNVML([], init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    with health.XidListener(nvml=missing) as listener:
        (got_missing,) = listener.results({0: "GPU-x"})
        assert got_missing.status is HealthStatus.UNAVAILABLE
        assert "NVMLError_DriverNotLoaded" in got_missing.reason


def test_a_closed_listener_is_unavailable() -> None:
    nvml = FakeNVML([h100(0)])
    listener = health.XidListener(nvml=nvml)
    (never_opened,) = listener.results({0: nvml.gpus[0].uuid})
    assert never_opened.status is HealthStatus.UNAVAILABLE
    listener.open()
    listener.close()
    assert xid_results(nvml, listener)[0].status is HealthStatus.UNAVAILABLE


def test_a_background_thread_polls_while_probes_read() -> None:
    nvml = FakeNVML([h100(0)])
    with health.XidListener(nvml=nvml) as listener:
        nvml.xid(0, 48)
        seen: list[list[health.XidEvent]] = []
        thread = threading.Thread(target=lambda: seen.append(listener.poll(timeout_ms=100)))
        thread.start()
        thread.join(timeout=30)
        assert [e.xid for e in seen[0]] == [48]
        assert listener.poll() == []  # taken once
        assert xid_results(nvml, listener)[0].value == [48]
