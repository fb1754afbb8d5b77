"""The NVML probes of each GPU, and the baseline that increases are measured from. Only
reads here; ``_rules`` decides."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from hardtrain import _nvml
from hardtrain.health import _rules as rules
from hardtrain.health._report import ProbeResult

NVLINK_COUNTERS = {"replay": _nvml.NVLINK_ERROR_DL_REPLAY,
                   "recovery": _nvml.NVLINK_ERROR_DL_RECOVERY,
                   "crc_flit": _nvml.NVLINK_ERROR_DL_CRC_FLIT,
                   "crc_data": _nvml.NVLINK_ERROR_DL_CRC_DATA}
_ABSENT = (_nvml.ERROR_NOT_SUPPORTED, _nvml.ERROR_INVALID_ARGUMENT)  # no such link/counter


@dataclasses.dataclass(frozen=True)
class GpuBaseline:
    """One GPU's counters at the baseline; None where they could not be read."""

    ecc_uncorrected: int | None
    nvlink_errors: dict[str, int] | None


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Error counters at one moment, so that later probes judge what grew since then (a
    run that starts on a GPU with old errors is then told apart from one that gets new
    ones). ``taken_at``: the clock's seconds; ``gpus``: by UUID (``index:N`` without one).
    Take it with ``take_baseline()`` before the first step; it is immutable, so any
    thread may probe against it."""

    taken_at: float
    gpus: Mapping[str, GpuBaseline]


def take_baseline(*, nvml: Any = None, clock: Callable[[], float] = time.monotonic) -> Baseline:
    """Read the counters ``probe`` compares with. Never raises: a GPU (or NVML) that
    cannot be read has no entry or None there, and its probes judge as if there were no
    baseline, which is the stricter way."""
    gpus: dict[str, GpuBaseline] = {}
    try:
        with _nvml.session(nvml) as lib:
            for gpu in _open(lib, None)[0]:
                gpus[gpu.key] = GpuBaseline(_or_none(getattr, gpu, "ecc_uncorrected"),
                                            _or_none(getattr, gpu, "nvlink_counters"))
    except Exception:  # NvmlUnavailable, or a count that fails: no baseline at all
        pass
    return Baseline(taken_at=clock(), gpus=gpus)


def probe_gpus(lib: Any, baseline: Baseline | None, only: Collection[int] | None,
               now: float) -> tuple[list[ProbeResult], dict[int, str | None]]:
    """Every NVML probe on every GPU (or those in ``only``): the results and each probed
    GPU's UUID by index."""
    gpus, results = _open(lib, only)
    for gpu in gpus:
        base = baseline.gpus.get(gpu.key) if baseline is not None else None
        seconds = now - baseline.taken_at if baseline is not None else None
        results += [_check(name, check, gpu, base, seconds) for name, check in CHECKS]
    return results, {gpu.index: gpu.uuid for gpu in gpus}


class _Gpu:
    """One GPU's handle, with what several probes read cached for one probe round."""

    def __init__(self, lib: Any, index: int, handle: Any, uuid: str | None) -> None:
        self.lib, self.index, self.handle, self.uuid = lib, index, handle, uuid
        self.key = uuid or f"index:{index}"

    @functools.cached_property
    def links(self) -> dict[int, bool]:
        up: dict[int, bool] = {}
        for link in range(_nvml.NVLINK_MAX_LINKS):
            try:
                up[link] = bool(self.lib.nvmlDeviceGetNvLinkState(self.handle, link))
            except Exception as e:
                if _nvml.error_code(e) not in _ABSENT:
                    raise
        return up

    @functools.cached_property
    def nvlink_counters(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for link in self.links:
            for name, counter in NVLINK_COUNTERS.items():
                try:
                    count = self.lib.nvmlDeviceGetNvLinkErrorCounter(self.handle, link, counter)
                except Exception as e:
                    if _nvml.error_code(e) not in _ABSENT:
                        raise
                    continue
                totals[name] = totals.get(name, 0) + int(count)
        return totals

    @functools.cached_property
    def ecc_uncorrected(self) -> int:
        return int(self.lib.nvmlDeviceGetTotalEccErrors(
            self.handle, _nvml.MEMORY_ERROR_TYPE_UNCORRECTED, _nvml.VOLATILE_ECC))

    @functools.cached_property
    def clock_reasons(self) -> int:
        try:  # older pynvml (AttributeError) or driver (FunctionNotFound): the old name
            return int(self.lib.nvmlDeviceGetCurrentClocksEventReasons(self.handle))
        except AttributeError:
            pass
        except Exception as e:
            if _nvml.error_code(e) != _nvml.ERROR_FUNCTION_NOT_FOUND:
                raise
        return int(self.lib.nvmlDeviceGetCurrentClocksThrottleReasons(self.handle))


def _open(lib: Any, only: Collection[int] | None) -> tuple[list[_Gpu], list[ProbeResult]]:
    gpus: list[_Gpu] = []
    problems: list[ProbeResult] = []
    try:
        count = int(lib.nvmlDeviceGetCount())
    except Exception as e:
        return [], [rules.result("nvml", rules.Finding(
            rules.UNAVAILABLE, f"NVML cannot count the GPUs: {_nvml.describe(e)}"))]
    if count == 0:
        problems.append(rules.result("nvml", rules.Finding(rules.UNAVAILABLE,
                                                           "NVML sees no GPU")))
    for index in range(count):
        if only is not None and index not in only:
            continue
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # a lost GPU fails here: UNHEALTHY, not skipped
            problems.append(rules.result("gpu", rules.nvml_error(e), gpu=index))
            continue
        uuid = _or_none(_uuid, lib, handle)
        gpus.append(_Gpu(lib, index, handle, uuid))
    missing = sorted(set(only or ()) - set(range(count)))
    if missing:
        problems.append(rules.result("nvml", rules.Finding(
            rules.UNAVAILABLE, f"no GPU with NVML index {missing} (NVML sees {count})")))
    return gpus, problems


def _or_none(read: Callable[..., Any], *args: Any) -> Any:
    try:
        return read(*args)
    except Exception:
        return None


def _uuid(lib: Any, handle: Any) -> str:
    return _nvml.text(lib.nvmlDeviceGetUUID(handle))


Check = Callable[[_Gpu, "GpuBaseline | None", "float | None"], rules.Finding]


def _check(name: str, check: Check, gpu: _Gpu, base: GpuBaseline | None,
           seconds: float | None) -> ProbeResult:
    try:
        finding = check(gpu, base, seconds)
    except Exception as e:  # NVMLError: NotSupported, NoPermission, GpuIsLost, ...
        finding = rules.nvml_error(e)
    return rules.result(name, finding, gpu=gpu.index, uuid=gpu.uuid)


def _ecc(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    return rules.ecc(gpu.ecc_uncorrected, base.ecc_uncorrected if base else None)


def _retired_pages(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    return rules.retired_pages(int(gpu.lib.nvmlDeviceGetRetiredPagesPendingStatus(gpu.handle)))


def _remapped_rows(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    correctable, uncorrectable, pending, failure = gpu.lib.nvmlDeviceGetRemappedRows(gpu.handle)
    return rules.remapped_rows(int(correctable), int(uncorrectable), int(pending), int(failure))


def _nvlink_state(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    return rules.nvlink_state(gpu.links)


def _nvlink_errors(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    if not gpu.links:
        return rules.Finding(rules.NOT_APPLICABLE, "the GPU has no NVLink")
    before = base.nvlink_errors if base is not None else None
    return rules.nvlink_errors(gpu.nvlink_counters, before, seconds if before is not None
                               else None)


def _throttle(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    return rules.throttle(gpu.clock_reasons)


def _temperature(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    lib, handle = gpu.lib, gpu.handle
    celsius = int(lib.nvmlDeviceGetTemperature(handle, _nvml.TEMPERATURE_GPU))
    slowdown = _or_none(lambda: int(lib.nvmlDeviceGetTemperatureThreshold(
        handle, _nvml.TEMPERATURE_THRESHOLD_SLOWDOWN)))
    shutdown = _or_none(lambda: int(lib.nvmlDeviceGetTemperatureThreshold(
        handle, _nvml.TEMPERATURE_THRESHOLD_SHUTDOWN)))
    return rules.temperature(celsius, slowdown, shutdown)


def _pcie(gpu: _Gpu, base: GpuBaseline | None, seconds: float | None) -> rules.Finding:
    lib, handle = gpu.lib, gpu.handle
    reasons = _or_none(lambda: gpu.clock_reasons)
    idle = None if reasons is None else bool(reasons & _nvml.CLOCKS_EVENT_GPU_IDLE)
    return rules.pcie_link(int(lib.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
                           int(lib.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
                           int(lib.nvmlDeviceGetCurrPcieLinkWidth(handle)),
                           int(lib.nvmlDeviceGetMaxPcieLinkWidth(handle)), idle)


def _recovery_action(gpu: _Gpu, base: GpuBaseline | None,
                     seconds: float | None) -> rules.Finding:
    field = gpu.lib.nvmlDeviceGetFieldValues(
        gpu.handle, [_nvml.FI_DEV_GET_GPU_RECOVERY_ACTION])[0]
    if field.nvmlReturn in _ABSENT:  # drivers before R550 do not know the field
        return rules.Finding(rules.NOT_APPLICABLE, "the driver reports no recovery action "
                             f"(field {_nvml.FI_DEV_GET_GPU_RECOVERY_ACTION}: nvmlReturn "
                             f"{field.nvmlReturn})")
    if field.nvmlReturn != 0:
        return rules.Finding(rules.UNAVAILABLE, "NVML: reading the recovery action returned "
                             f"{field.nvmlReturn}")
    return rules.recovery_action(int(field.value.uiVal))


CHECKS: tuple[tuple[str, Check], ...] = (
    ("ecc.uncorrected", _ecc),
    ("retired_pages.pending", _retired_pages),
    ("remapped_rows", _remapped_rows),
    ("nvlink.state", _nvlink_state),
    ("nvlink.errors", _nvlink_errors),
    ("throttle", _throttle),
    ("temperature", _temperature),
    ("pcie.link", _pcie),
    ("recovery_action", _recovery_action),
)
