"""Fakes at the health probes' two seams: NVML (pynvml's functions, names, arguments,
return shapes and exceptions: ``pynvml.NVMLError(code)`` builds the same subclass the
real binding raises) and a ``dcgmi`` on PATH that replays a fixture."""

from __future__ import annotations

import dataclasses
import os
import stat
import types
from pathlib import Path
from typing import Any

import pynvml
import pytest

FIXTURES = Path(__file__).parent / "fixtures"

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND


@dataclasses.dataclass(frozen=True)
class Raises:
    """In a FakeGpu field: the call raises ``pynvml.NVMLError(code)``."""

    code: int


def _give(value: Any) -> Any:
    if isinstance(value, Raises):
        raise pynvml.NVMLError(value.code)
    return value


@dataclasses.dataclass
class FakeGpu:
    """One GPU as NVML shows it; the defaults are a healthy H100 SXM (18 NVLinks up,
    Hopper: no page retirement, row remapping instead)."""

    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    name: str = "NVIDIA H100 80GB HBM3"
    handle: Raises | None = None
    ecc_uncorrected: int | Raises = 0
    retired_pending: int | Raises = Raises(NOT_SUPPORTED)
    remapped_rows: tuple[int, int, int, int] | Raises = (0, 0, 0, 0)
    nvlinks: list[int] | Raises = dataclasses.field(default_factory=lambda: [1] * 18)
    nvlink_errors: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    nvlink_counters: Raises | None = None
    clock_reasons: int | Raises = 0
    old_driver: bool = False  # no nvmlDeviceGetCurrentClocksEventReasons in the driver
    temperature: int | Raises = 45
    slowdown_c: int | Raises = 87
    shutdown_c: int | Raises = 92
    pcie: tuple[int, int, int, int] | Raises = (5, 5, 16, 16)  # gen, max gen, width, max width
    recovery_return: int = 0  # the field's nvmlReturn
    recovery_action: int = 0
    events: Raises | None = None  # nvmlDeviceRegisterEvents raises this


def h100(index: int, **changes: Any) -> FakeGpu:
    return FakeGpu(uuid=f"GPU-{index:08d}-1111-2222-3333-444444444444", **changes)


def rtx4090(index: int, **changes: Any) -> FakeGpu:
    """A consumer card: no ECC, no row remapping, no NVLink, no recovery field."""
    fields: dict[str, Any] = dict(
        name="NVIDIA GeForce RTX 4090", ecc_uncorrected=Raises(NOT_SUPPORTED),
        remapped_rows=Raises(NOT_SUPPORTED), nvlinks=Raises(NOT_SUPPORTED),
        pcie=(4, 4, 16, 16), recovery_return=NOT_SUPPORTED)
    fields.update(changes)
    return FakeGpu(uuid=f"GPU-{index:08d}-4090-4090-4090-409040904090", **fields)


@dataclasses.dataclass(frozen=True)
class Handle:
    index: int


class FakeNVML:
    """pynvml's functions over ``gpus``. Counts nvmlInit/nvmlShutdown, so a test can check
    every session is closed."""

    def __init__(self, gpus: list[FakeGpu], *, init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.num_inits = 0
        self.num_shutdowns = 0
        self.event_sets: list[FakeEventSet] = []

    def gpu(self, handle: Handle) -> FakeGpu:
        assert isinstance(handle, Handle), handle
        return self.gpus[handle.index]

    # -- library
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.num_inits += 1

    def nvmlShutdown(self) -> None:
        self.num_shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        _give(self.gpus[index].handle)
        return Handle(index)

    # -- identity (also what the run metadata reads)
    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        return self.gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        return self.gpu(handle).name

    def nvmlDeviceGetVbiosVersion(self, handle: Handle) -> str:
        return "96.00.89.00.01"

    def nvmlDeviceGetEccMode(self, handle: Handle) -> tuple[int, int]:
        _give(self.gpu(handle).ecc_uncorrected)
        return (1, 1)

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> Any:
        return types.SimpleNamespace(total=80 * 2**30, free=80 * 2**30, used=0)

    # -- memory
    def nvmlDeviceGetTotalEccErrors(self, handle: Handle, error_type: int, counter: int) -> int:
        assert error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        assert counter == pynvml.NVML_VOLATILE_ECC
        return int(_give(self.gpu(handle).ecc_uncorrected))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Handle) -> int:
        return int(_give(self.gpu(handle).retired_pending))

    def nvmlDeviceGetRemappedRows(self, handle: Handle) -> tuple[int, int, int, int]:
        rows: tuple[int, int, int, int] = _give(self.gpu(handle).remapped_rows)
        return rows

    # -- NVLink
    def nvmlDeviceGetNvLinkState(self, handle: Handle, link: int) -> int:
        links: list[int] = _give(self.gpu(handle).nvlinks)
        if link >= len(links):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return links[link]

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: Handle, link: int, counter: int) -> int:
        assert counter in (pynvml.NVML_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
                           pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
                           pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA)
        gpu = self.gpu(handle)
        _give(gpu.nvlink_counters)
        return gpu.nvlink_errors.get((link, counter), 0)

    # -- clocks, heat, PCIe
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Handle) -> int:
        if self.gpu(handle).old_driver:
            raise pynvml.NVMLError(FUNCTION_NOT_FOUND)
        return int(_give(self.gpu(handle).clock_reasons))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Handle) -> int:
        return int(_give(self.gpu(handle).clock_reasons))

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return int(_give(self.gpu(handle).temperature))

    def nvmlDeviceGetTemperatureThreshold(self, handle: Handle, kind: int) -> int:
        gpu = self.gpu(handle)
        if kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN:
            return int(_give(gpu.slowdown_c))
        assert kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
        return int(_give(gpu.shutdown_c))

    def _pcie(self, handle: Handle, i: int) -> int:
        pcie: tuple[int, int, int, int] = _give(self.gpu(handle).pcie)
        return pcie[i]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Handle) -> int:
        return self._pcie(handle, 0)

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Handle) -> int:
        return self._pcie(handle, 1)

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: Handle) -> int:
        return self._pcie(handle, 2)

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Handle) -> int:
        return self._pcie(handle, 3)

    def nvmlDeviceGetFieldValues(self, handle: Handle, field_ids: list[int]) -> Any:
        """The real return type: a ctypes array of ``c_nvmlFieldValue_t``."""
        assert field_ids == [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
        gpu = self.gpu(handle)
        values = (pynvml.c_nvmlFieldValue_t * 1)()
        values[0].fieldId = field_ids[0]
        values[0].nvmlReturn = gpu.recovery_return
        values[0].value.uiVal = gpu.recovery_action
        return values

    # -- events
    def nvmlEventSetCreate(self) -> FakeEventSet:
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: Handle, event_types: int,
                                 event_set: FakeEventSet) -> None:
        assert event_types & pynvml.nvmlEventTypeXidCriticalError
        _give(self.gpu(handle).events)
        event_set.devices.add(handle.index)

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        assert not event_set.freed
        if not event_set.queue:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        return event_set.queue.pop(0)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        event_set.freed = True

    def xid(self, index: int, code: int) -> None:
        """The driver reports XID ``code`` on GPU ``index``: every set listening gets it,
        shaped like ``c_nvmlEventData_t``."""
        for event_set in self.event_sets:
            if index in event_set.devices and not event_set.freed:
                event_set.queue.append(types.SimpleNamespace(
                    device=Handle(index), eventType=pynvml.nvmlEventTypeXidCriticalError,
                    eventData=code, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF))


@dataclasses.dataclass
class FakeEventSet:
    devices: set[int] = dataclasses.field(default_factory=set)
    queue: list[Any] = dataclasses.field(default_factory=list)
    freed: bool = False


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the fake dcgmi does for one subcommand: print ``fixture`` (a file name in
    fixtures/), exit ``code``; or hang."""

    fixture: str | None = None
    code: int = 0
    hang: bool = False


def fake_dcgmi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, diag: Reply | None = None,
               health: Reply | None = None) -> Path:
    """Put a ``dcgmi`` first on PATH that answers ``diag`` and ``health``; returns the file
    where it logs its arguments, one call per line."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "dcgmi-calls.txt"
    lines = ["#!/bin/sh", f"echo \"$@\" >> '{calls}'", 'case "$1" in']
    for name, reply in (("diag", diag), ("health", health)):
        if reply is None:
            continue
        if reply.hang:  # no exec: sleep is a child holding the pipes, as nvvs would be
            lines.append(f"  {name}) sleep 600; exit 0;;")
        else:
            lines.append(f"  {name}) cat '{FIXTURES / str(reply.fixture)}'; exit {reply.code};;")
    lines += ["esac", 'echo "fake dcgmi: unexpected arguments: $*" >&2', "exit 254", ""]
    script = bin_dir / "dcgmi"
    script.write_text("\n".join(lines))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return calls


def no_dcgmi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PATH holds only an empty folder: no dcgmi anywhere."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
