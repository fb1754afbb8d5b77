"""``hardtrain health``: the table or JSON, and its exit codes (0 healthy, 1 unhealthy,
2 bad usage, 3 could not check). NVML is faked by putting the fake in place of the
pynvml module; dcgmi by a script on PATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hardtrain.cli
from hardtrain.health import HealthReport, HealthStatus
from tests.health.fakes import FakeNVML, Reply, fake_dcgmi, h100, no_dcgmi

GB10_R1 = "dcgmi_diag_r1_json_dcgm4.2.3_gb10.json"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = hardtrain.cli.main(["health", *args])
    out, err = capsys.readouterr()
    return code, out + err


def with_nvml(monkeypatch: pytest.MonkeyPatch, nvml: FakeNVML | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: `import pynvml` fails


def test_healthy_exits_0_with_a_table(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with_nvml(monkeypatch, FakeNVML([h100(0), h100(1)]))
    code, out = run(capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].endswith(": HEALTHY (action: none)")
    assert lines[1].split() == ["GPU", "PROBE", "STATUS", "VALUE"]
    assert any(line.split()[:4] == ["0", "ecc.uncorrected", "HEALTHY", "0"] for line in lines)
    assert any(line.split()[:3] == ["1", "retired_pages.pending", "NOT_APPLICABLE"]
               for line in lines)
    assert "GPU 1: GPU-00000001-1111-2222-3333-444444444444" in lines
    assert lines[-1] == "verdict HEALTHY: exit 0"


def test_unhealthy_exits_1_and_names_the_failing_probe(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with_nvml(monkeypatch, FakeNVML([h100(0), h100(1, ecc_uncorrected=3)]))
    code, out = run(capsys)
    assert code == 1, out
    assert any(line.split()[:4] == ["1", "ecc.uncorrected", "UNHEALTHY", "3"]
               for line in out.splitlines())
    assert ("UNHEALTHY: GPU 1 (GPU-00000001-1111-2222-3333-444444444444) ecc.uncorrected: "
            "3 uncorrected (double-bit) ECC error(s)") in out
    assert "See runbooks/ecc-errors.md" in out
    assert out.splitlines()[-1] == "verdict UNHEALTHY: exit 1"


def test_no_nvml_and_no_dcgmi_is_never_exit_0(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    with_nvml(monkeypatch, None)
    no_dcgmi(tmp_path, monkeypatch)
    code, out = run(capsys)
    assert code == 3, out
    assert "UNAVAILABLE: host nvml: pynvml is not installed" in out
    code, out = run(capsys, "--dcgm-level", "1")
    assert code == 3 and "dcgmi not found on PATH" in out
    with_nvml(monkeypatch, FakeNVML([h100(0)]))
    code, out = run(capsys, "--dcgm-health")  # NVML fine, but dcgmi was asked for
    assert code == 3 and "UNAVAILABLE: host dcgm.health: dcgmi not found" in out


def test_warnings_exit_0_and_are_listed(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    with_nvml(monkeypatch, FakeNVML([h100(0)]))
    fake_dcgmi(tmp_path, monkeypatch, diag=Reply(GB10_R1, 226))
    code, out = run(capsys, "--dcgm-level", "1")
    assert code == 0, out
    assert "WARN: GPU 0 (GPU-00000000-1111-2222-3333-444444444444) dcgm.diag.software: " \
        "dcgmi diag software: Fail: Persistence Mode" in out
    assert out.splitlines()[-1] == "verdict WARN: exit 0"


def test_json_output_round_trips(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with_nvml(monkeypatch, FakeNVML([h100(0, remapped_rows=(0, 1, 1, 0))]))
    fake_dcgmi(tmp_path, monkeypatch, diag=Reply(hang=True))
    code, out = run(capsys, "--dcgm-level", "2", "--timeout", "0.5", "--json")
    assert code == 1, out  # unhealthy outranks could-not-check
    data = json.loads(out)
    assert (data["verdict"], data["action"]) == ("unhealthy", "reset_gpu")
    report = HealthReport.from_json(data)
    assert report.verdict is HealthStatus.UNHEALTHY
    (hang,) = [r for r in report.results if r.probe == "dcgm.diag"]
    assert hang.status is HealthStatus.UNAVAILABLE and "within 0.5 s" in hang.reason


def test_bad_usage_exits_2_and_help_documents_the_exit_codes(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as bad:
        hardtrain.cli.main(["health", "--dcgm-level", "5"])
    assert bad.value.code == 2
    with pytest.raises(SystemExit) as shown:
        hardtrain.cli.main(["health", "--help"])
    assert shown.value.code == 0
    out = capsys.readouterr().out
    for line in ("0  healthy", "1  unhealthy", "2  bad usage", "3  could not check"):
        assert line in out
    assert hardtrain.cli.main(["health", "--dcgm-level", "1", "--timeout", "-1"]) == 2


def test_the_installed_command_without_nvml_exits_3(tmp_path: Path) -> None:
    command = shutil.which("hardtrain", path=os.path.dirname(sys.executable))
    assert command is not None
    (tmp_path / "pynvml.py").write_text("raise ImportError('no NVML here (test)')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([command, "health"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "pynvml is not installed (no NVML here (test))" in done.stdout
    assert "Traceback" not in done.stderr
