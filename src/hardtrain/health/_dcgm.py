"""``dcgmi diag -r LEVEL -j`` and ``dcgmi health -c -j``: run with a timeout, parse,
judge. A dcgmi that is missing, hangs, exits with a status that carries no results or
prints something that is not its JSON is a tool error (UNAVAILABLE), never a verdict.

``dcgmi diag -j`` has had two trees: DCGM 4.x's ``{"DCGM Diagnostic": {"test_categories":
[...]}}``, results naming ``entity_group``/``entity_id``; and 2.x/3.x's ``{"DCGM GPU
Diagnostic": {...}}``, results naming ``gpu_ids`` (2.x, warnings as one string without a
severity) or ``gpu_id`` (3.x, warnings as objects). A warning prints as "Fail", so each
is judged by its ``error_severity`` (``_rules.DCGM_SEVERITIES``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

from hardtrain.errors import XID_RUNBOOK
from hardtrain.health import _rules as rules
from hardtrain.health._report import HealthAction, HealthStatus, ProbeResult, severity


@dataclasses.dataclass(frozen=True)
class _Ran:
    command: str
    code: int
    out: str
    err: str


class _ToolError(Exception):
    """dcgmi did not give a verdict; ``str`` says why."""


def diag(level: int, *, timeout_s: float, dcgmi: str,
         uuids: Mapping[int, str | None]) -> list[ProbeResult]:
    """Run ``dcgmi diag -r LEVEL -j``; one result per test and entity."""
    try:
        ran = _run([dcgmi, "diag", "-r", str(level), "-j"], timeout_s)
        results = [_diag_result(entry, uuids) for entry in _parse_diag(ran)]
    except _ToolError as e:
        return [_tool_error("dcgm.diag", str(e))]
    found = any(severity(r.status) >= severity(HealthStatus.WARN) for r in results)
    if ran.code not in rules.DCGM_DIAG_EXITS:
        results.append(_tool_error("dcgm.diag", f"`{ran.command}`: {rules.dcgm_exit(ran.code)}"
                                   f"{_tail(ran.err)}: a tool error, whatever it printed"))
    elif ran.code != 0 and not found:
        results.append(_tool_error("dcgm.diag", f"`{ran.command}`: "
                                   f"{rules.dcgm_exit(ran.code)}, but its JSON shows no "
                                   "failure: cannot tell what failed"))
    return results


def health(*, timeout_s: float, dcgmi: str, uuids: Mapping[int, str | None]) -> list[ProbeResult]:
    """Run ``dcgmi health -c -j`` (it exits 0 whatever it finds): the group's overall
    health, and one result per GPU with incidents. Needs watches set beforehand
    (``dcgmi health -s a``)."""
    try:
        ran = _run([dcgmi, "health", "-c", "-j"], timeout_s)
        body = _json(ran).get("body")
        if ran.code != 0 or not isinstance(body, dict) or "Overall Health" not in body:
            raise _ToolError(f"`{ran.command}`: {rules.dcgm_exit(ran.code)}: "
                             f"{_first_line(ran.out) or 'no Overall Health in its JSON'}"
                             f"{_tail(ran.err)}")
    except _ToolError as e:
        return [_tool_error("dcgm.health", str(e))]
    overall = _value(body["Overall Health"])
    status, action = rules.dcgm_health(overall)
    results = [_health_gpu(gpu_id, node, uuids) for gpu_id, node in
               _children(body.get("GPU")).items()]
    reason = f"dcgmi health: overall {overall}" if status is not HealthStatus.UNAVAILABLE \
        else f"dcgmi health: unknown overall health {overall!r}"
    worst = next((r for r in results if r.status is status), None)  # the GPU behind it
    runbook = worst.runbook if worst is not None else XID_RUNBOOK
    return [rules.result("dcgm.health", rules.Finding(status, reason, overall, "Healthy",
                                                      action), runbook=runbook), *results]


# ---------------------------------------------------------------------------- running
def _run(argv: list[str], timeout_s: float) -> _Ran:
    """``argv`` with its own process group, so that a timeout kills what it started too
    (dcgmi's nvvs; a script's children that hold the pipes open)."""
    command = " ".join(argv)
    exe = shutil.which(argv[0])
    if exe is None:
        raise _ToolError(f"{argv[0]} not found on PATH: DCGM is not installed here, or not "
                         "on PATH")
    try:
        proc = subprocess.Popen([exe, *argv[1:]], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as e:
        raise _ToolError(f"`{command}` could not start: {e}") from e
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise _ToolError(f"`{command}` did not finish within {timeout_s:g} s; killed it and "
                         "its children") from None
    return _Ran(command, proc.returncode, out.decode(errors="replace"),
                err.decode(errors="replace"))


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)  # a grandchild that left the group keeps the pipes
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _json(ran: _Ran) -> dict[str, Any]:
    try:
        data = json.loads(ran.out)
    except ValueError:
        raise _ToolError(f"`{ran.command}`: {rules.dcgm_exit(ran.code)}, and printed "
                         f"something that is not JSON: {_first_line(ran.out)!r}"
                         f"{_tail(ran.err)}") from None
    if not isinstance(data, dict):
        raise _ToolError(f"`{ran.command}`: JSON that is not an object")
    return data


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]


def _tail(err: str) -> str:
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    return f" (stderr: {lines[-1][:200]})" if lines else ""


def _tool_error(probe: str, reason: str) -> ProbeResult:
    return rules.result(probe, rules.Finding(HealthStatus.UNAVAILABLE, reason))


# ---------------------------------------------------------------------------- diag
@dataclasses.dataclass(frozen=True)
class _Warning:
    text: str
    error_id: int | None
    category: int | None
    severity: int | None


@dataclasses.dataclass(frozen=True)
class _Entry:
    test: str
    gpu: int | None
    entity: str  # "GPU 0", "CPU 1", "host"
    printed: str  # Pass, Fail, Warn, Skip, ...
    warnings: tuple[_Warning, ...]


def _parse_diag(ran: _Ran) -> list[_Entry]:
    data = _json(ran)
    root = data.get("DCGM Diagnostic", data.get("DCGM GPU Diagnostic"))
    if not isinstance(root, dict):
        raise _ToolError(f"`{ran.command}`: {rules.dcgm_exit(ran.code)}; its JSON has neither "
                         "\"DCGM Diagnostic\" (4.x) nor \"DCGM GPU Diagnostic\" (2.x/3.x)")
    if root.get("runtime_error"):
        raise _ToolError(f"`{ran.command}`: {rules.dcgm_exit(ran.code)}: runtime error: "
                         f"{root['runtime_error']}")
    entries = [_entry(test, result) for category in _list(root.get("test_categories"))
               for test in _list(category.get("tests"))
               for result in _list(test.get("results"))]
    if not entries:
        raise _ToolError(f"`{ran.command}`: {rules.dcgm_exit(ran.code)}, and no test results")
    return entries


def _list(value: Any) -> list[dict[str, Any]]:
    """The objects of a JSON array (3.x leaves nulls where it skipped an index)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _entry(test: dict[str, Any], result: dict[str, Any]) -> _Entry:
    gpu, entity = _entity(result)
    raw = result.get("warnings")
    warnings = (_Warning(raw, None, None, None),) if isinstance(raw, str) else tuple(
        _Warning(str(w.get("warning", w.get("warnings", ""))), _int(w.get("error_id")),
                 _int(w.get("error_category")), _int(w.get("error_severity")))
        for w in _list(raw))
    return _Entry(str(test.get("name", "?")), gpu, entity, str(result.get("status", "")),
                  warnings)


def _entity(result: dict[str, Any]) -> tuple[int | None, str]:
    if "entity_group" in result:  # 4.x
        group, number = str(result["entity_group"]), _int(result.get("entity_id"))
        gpu = number if group == "GPU" else None
        return gpu, f"{group} {number}"
    number = _int(result.get("gpu_id", result.get("gpu_ids")))  # 3.x, 2.x ("0": a string)
    if number is None or not 0 <= number < 1024:  # absent, a list, or an unset id
        return None, "host"
    return number, f"GPU {number}"


def _int(value: Any) -> int | None:
    try:
        return int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _diag_result(entry: _Entry, uuids: Mapping[int, str | None]) -> ProbeResult:
    name = entry.test.strip().lower().replace(" ", "_").replace("/", "_")
    finding = _judge(entry)
    runbook = rules.dcgm_runbook([w.category for w in entry.warnings if w.category is not None],
                                 entry.test)
    return rules.result(f"dcgm.diag.{name}", finding, gpu=entry.gpu,
                        uuid=uuids.get(entry.gpu) if entry.gpu is not None else None,
                        runbook=runbook)


def _judge(entry: _Entry) -> rules.Finding:
    where = "" if entry.gpu is not None else f" on {entry.entity}"
    if entry.warnings:
        judged = [(*rules.dcgm_warning(w.severity, entry.printed), w) for w in entry.warnings]
        status, action = max(((s, a) for s, a, _, _ in judged), key=_rank)
        said = "; ".join(f"{w.text.strip()} (error {w.error_id}, {how})"
                         for _, _, how, w in judged)
        return rules.Finding(status, f"dcgmi diag {entry.test}{where}: {entry.printed}: {said}",
                             entry.printed, "Pass", action)
    known = rules.dcgm_status(entry.printed)
    if known is None:
        return rules.Finding(HealthStatus.UNAVAILABLE, f"dcgmi diag {entry.test}{where}: "
                             f"status {entry.printed!r} is not one hardtrain knows",
                             entry.printed, "Pass")
    words = {"Pass": "passed", "Skip": "skipped by dcgmi (not run on this GPU or platform)",
             "Not Run": "not run", "Warn": "warned without saying why",
             "Fail": "failed without saying why (no severity: counted as unhealthy)"}
    return rules.Finding(known[0], f"dcgmi diag {entry.test}{where}: {words[entry.printed]}",
                         entry.printed, "Pass", known[1])


def _rank(judged: tuple[HealthStatus, HealthAction]) -> tuple[int, int]:
    return severity(judged[0]), list(HealthAction).index(judged[1])


# ---------------------------------------------------------------------------- health -c
def _value(node: Any) -> str:
    return str(node.get("value", "")) if isinstance(node, dict) else ""


def _children(node: Any) -> dict[str, Any]:
    children = node.get("children") if isinstance(node, dict) else None
    return children if isinstance(children, dict) else {}


def _health_gpu(gpu_id: str, node: Any, uuids: Mapping[int, str | None]) -> ProbeResult:
    """One GPU of ``dcgmi health -c -j``: ``{"value": "Warning", "children": {"Errors":
    {"children": {"Memory system": {"value": ..., "overflow": [message, ...]}}}}}``."""
    printed = _value(node)
    status, action = rules.dcgm_health(printed)
    systems = _children(_children(node).get("Errors"))
    said = "; ".join(f"{name}: {_value(system)}: "
                     + " ".join(str(m) for m in (system.get("overflow") or []))
                     for name, system in systems.items() if isinstance(system, dict))
    gpu = _int(gpu_id)
    reason = f"dcgmi health: {printed or 'no verdict'}" + (f": {said}" if said else "")
    if status is HealthStatus.UNAVAILABLE:
        reason = f"dcgmi health: unknown health {printed!r} for GPU {gpu_id}"
    return rules.result("dcgm.health", rules.Finding(status, reason, printed, "Healthy", action),
                        gpu=gpu, uuid=uuids.get(gpu) if gpu is not None else None,
                        runbook=rules.dcgm_runbook([], *systems))
