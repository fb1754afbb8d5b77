"""XID events from NVML's event sets. NVML hands an XID only to event sets that exist
when it happens, so a listener opens before training and stays open; probes read what
it collected."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from hardtrain import _nvml
from hardtrain.health import _rules as rules
from hardtrain.health._report import ProbeResult

MAX_EVENTS_PER_POLL = 10_000  # a storm of events cannot keep one poll busy for ever


@dataclasses.dataclass(frozen=True)
class XidEvent:
    """One XID: its number, the GPU (NVML index and UUID; None if NVML could not say)
    and when this process saw it (``time.time()``)."""

    xid: int
    gpu: int | None
    uuid: str | None
    seen_at: float


class XidListener:
    """Collects the XIDs NVML reports on every GPU, from ``open`` to ``close`` (or as a
    context manager). Opening never raises: where NVML or a GPU cannot listen, the
    ``xid`` results say so (UNAVAILABLE or NOT_APPLICABLE).

    Thread-safe: a background thread may ``poll`` with a timeout while another thread
    probes; ``probe(xids=listener)`` polls without waiting before it reports.
    """

    def __init__(self, *, nvml: Any = None) -> None:
        self._nvml = nvml
        self._lib: Any = None
        self._set: Any = None
        self._registered: dict[str, tuple[int, BaseException | None]] = {}  # key -> index
        self._events: list[XidEvent] = []
        self._problem: str | None = "the XID listener is not open"
        self._wait_lock = threading.Lock()  # one NVML wait at a time
        self._lock = threading.Lock()  # the events and the state above

    def __enter__(self) -> XidListener:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> XidListener:
        with self._wait_lock, self._lock:
            if self._set is not None:
                return self
            try:
                self._lib = _nvml.load(self._nvml)
                self._lib.nvmlInit()
            except Exception as e:
                self._problem = f"NVML: {e}" if isinstance(e, _nvml.NvmlUnavailable) \
                    else f"NVML: {_nvml.describe(e)}"
                self._lib = None
                return self
            try:
                self._set = self._lib.nvmlEventSetCreate()
                self._register_all()
                self._problem = None
            except Exception as e:
                self._problem = f"NVML could not listen for XIDs: {_nvml.describe(e)}"
        return self

    def _register_all(self) -> None:
        lib = self._lib
        for index in range(int(lib.nvmlDeviceGetCount())):
            key, error = f"index:{index}", None
            try:
                handle = lib.nvmlDeviceGetHandleByIndex(index)
                key = _nvml.text(lib.nvmlDeviceGetUUID(handle))
                lib.nvmlDeviceRegisterEvents(handle, _nvml.EVENT_TYPE_XID_CRITICAL_ERROR,
                                             self._set)
            except Exception as e:  # NotSupported on some GPUs: that GPU only
                error = e
            self._registered[key] = (index, error)

    def poll(self, timeout_ms: int = 0) -> list[XidEvent]:
        """Take the XIDs NVML has queued, waiting up to ``timeout_ms`` for the first;
        returns the new ones (all are kept for the probes). If another thread is
        waiting already, returns at once: that thread collects them."""
        if not self._wait_lock.acquire(blocking=timeout_ms > 0):
            return []
        try:
            new, problem = self._wait(timeout_ms)
        finally:
            self._wait_lock.release()
        with self._lock:
            self._events.extend(new)
            if self._set is not None:
                self._problem = problem
        return new

    def _wait(self, timeout_ms: int) -> tuple[list[XidEvent], str | None]:
        if self._set is None:
            return [], None
        new: list[XidEvent] = []
        for _ in range(MAX_EVENTS_PER_POLL):
            try:
                data = self._lib.nvmlEventSetWait(self._set, timeout_ms if not new else 0)
            except Exception as e:
                if _nvml.error_code(e) == _nvml.ERROR_TIMEOUT:
                    break
                return new, f"NVML stopped delivering XIDs: {_nvml.describe(e)}"
            new.append(self._event(data))
        return new, None

    def _event(self, data: Any) -> XidEvent:
        uuid: str | None = None
        with contextlib.suppress(Exception):
            uuid = _nvml.text(self._lib.nvmlDeviceGetUUID(data.device))
        index = self._registered.get(uuid, (None, None))[0] if uuid else None
        return XidEvent(xid=int(data.eventData), gpu=index, uuid=uuid, seen_at=time.time())

    @property
    def events(self) -> tuple[XidEvent, ...]:
        """Every XID seen since ``open``, oldest first."""
        with self._lock:
            return tuple(self._events)

    def close(self) -> None:
        with self._wait_lock, self._lock:
            if self._lib is None:
                return
            with contextlib.suppress(Exception):
                if self._set is not None:
                    self._lib.nvmlEventSetFree(self._set)
            with contextlib.suppress(Exception):
                self._lib.nvmlShutdown()
            self._lib, self._set = None, None
            self._problem = "the XID listener is closed"

    def results(self, gpus: Mapping[int, str | None]) -> list[ProbeResult]:
        """The ``xid`` result of each GPU in ``gpus`` (index -> UUID), and one for the host
        if an XID came from a GPU NVML could not name."""
        with self._lock:
            events, problem, registered = list(self._events), self._problem, \
                dict(self._registered)
        out = [rules.result("xid", self._finding(index, uuid, events, problem, registered),
                            gpu=index, uuid=uuid) for index, uuid in gpus.items()]
        unnamed = [e.xid for e in events if e.uuid is None]
        if unnamed:
            out.append(rules.result("xid", rules.xids(unnamed)))
        return out

    @staticmethod
    def _finding(index: int, uuid: str | None, events: list[XidEvent], problem: str | None,
                 registered: Mapping[str, tuple[int, BaseException | None]]) -> rules.Finding:
        if problem is not None:
            return rules.Finding(rules.UNAVAILABLE, problem)
        entry = registered.get(uuid or f"index:{index}")
        if entry is None:
            return rules.Finding(rules.UNAVAILABLE, "the GPU was not there when the XID "
                                 "listener opened")
        if entry[1] is not None:
            return rules.nvml_error(entry[1])
        return rules.xids([e.xid for e in events if e.uuid is not None and e.uuid == uuid])
