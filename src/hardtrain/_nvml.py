"""The one seam to NVML, shared by the run metadata (``_probes.gpus``) and the health
probes (``hardtrain.health``).

``nvml`` is anything with pynvml's functions: ``None`` means the ``pynvml`` module of
nvidia-ml-py, a test passes a fake with the same names, arguments and exceptions. Only
functions go through the seam: the constants below are NVML's C values (part of its
ABI, so they cannot change; a test pins them to pynvml's), so a fake need not carry them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# nvmlReturn_t: the codes an NVMLError carries in ``value``
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_TIMEOUT = 10
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16

# nvmlDeviceGetTotalEccErrors(handle, errorType, counterType)
MEMORY_ERROR_TYPE_UNCORRECTED = 1
VOLATILE_ECC = 0
# nvmlDeviceGetTemperature / ...Threshold
TEMPERATURE_GPU = 0
TEMPERATURE_THRESHOLD_SHUTDOWN = 0
TEMPERATURE_THRESHOLD_SLOWDOWN = 1
# NVLink: link indices are below this; nvmlDeviceGetNvLinkErrorCounter's counters
NVLINK_MAX_LINKS = 36
NVLINK_ERROR_DL_REPLAY = 0
NVLINK_ERROR_DL_RECOVERY = 1
NVLINK_ERROR_DL_CRC_FLIT = 2
NVLINK_ERROR_DL_CRC_DATA = 3
# nvmlDeviceGetFieldValues: the driver's recommended recovery (R550 and newer)
FI_DEV_GET_GPU_RECOVERY_ACTION = 230
# nvmlDeviceRegisterEvents: every XID, not only "critical" ones, despite the name
EVENT_TYPE_XID_CRITICAL_ERROR = 0x8

# nvmlClocksEventReason* (formerly nvmlClocksThrottleReason*: the same bits)
CLOCKS_EVENT_GPU_IDLE = 0x1
CLOCKS_EVENT_APPLICATIONS_CLOCKS_SETTING = 0x2
CLOCKS_EVENT_SW_POWER_CAP = 0x4
CLOCKS_EVENT_HW_SLOWDOWN = 0x8
CLOCKS_EVENT_SYNC_BOOST = 0x10
CLOCKS_EVENT_SW_THERMAL_SLOWDOWN = 0x20
CLOCKS_EVENT_HW_THERMAL_SLOWDOWN = 0x40
CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN = 0x80
CLOCKS_EVENT_DISPLAY_CLOCK_SETTING = 0x100


class NvmlUnavailable(Exception):
    """NVML cannot be used here (no pynvml, no driver, a CPU machine); ``str`` says why."""


def load(nvml: Any = None) -> Any:
    """``nvml``, or the pynvml module when it is None."""
    if nvml is not None:
        return nvml
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable(f"pynvml is not installed ({e})") from e
    return pynvml


@contextlib.contextmanager
def session(nvml: Any = None) -> Iterator[Any]:
    """NVML initialised for the block (``nvmlInit`` ... ``nvmlShutdown``); yields the
    functions. NVML counts its initialisations, so sessions may nest and overlap across
    threads. Raises ``NvmlUnavailable`` when NVML cannot start."""
    lib = load(nvml)
    try:
        lib.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, OSError, ...
        raise NvmlUnavailable(f"NVML: {type(e).__name__}: {e}") from e
    try:
        yield lib
    finally:
        with contextlib.suppress(Exception):
            lib.nvmlShutdown()


def error_code(error: BaseException) -> int | None:
    """The nvmlReturn_t of an NVMLError (its ``value``), None for any other exception."""
    value = getattr(error, "value", None)
    return value if isinstance(value, int) else None


def describe(error: BaseException) -> str:
    """``NVMLError_NoPermission: Insufficient Permissions``: the class names the code."""
    return f"{type(error).__name__}: {error}"


def text(value: Any) -> str:
    """NVML strings come back as bytes from older pynvml, str from newer."""
    return value.decode() if isinstance(value, bytes) else str(value)
