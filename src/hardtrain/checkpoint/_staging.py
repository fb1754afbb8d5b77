"""CPU staging buffers for async saves, allocated once and reused.

A copy into fresh memory costs page faults (about 20x a copy into warm memory on a
small VM), so the buffer is kept between saves and reallocated only when the set of
tensors (names, dtypes, shapes) changes. On GPU the buffer is pinned, the copies are
non-blocking, and the host waits for them in the background thread, not in the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

_ALIGN = 64


class StagedTensors:
    """Views into the staging buffer, valid once ``ready()`` returned."""

    def __init__(self, tensors: dict[str, torch.Tensor], events: list[torch.cuda.Event]) -> None:
        self.tensors = tensors
        self._events = events

    def ready(self) -> None:
        for event in self._events:
            event.synchronize()

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class StagingBuffer:
    def __init__(self) -> None:
        self._layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...] | None = None
        self._buffer: torch.Tensor | None = None
        self._views: dict[str, torch.Tensor] = {}

    def stage(self, tensors: Mapping[str, torch.Tensor]) -> StagedTensors:
        """Copy ``tensors`` into the buffer. The caller must not stage again before the
        previous StagedTensors has been written out."""
        layout = tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())
        on_gpu = {t.device for t in tensors.values() if t.device.type == "cuda"}
        if layout != self._layout or (on_gpu and not self._is_pinned()):
            self._allocate(layout, pin=bool(on_gpu))
        with torch.no_grad():
            for name, t in tensors.items():
                self._views[name].copy_(t.detach(), non_blocking=t.device.type == "cuda")
        events = []
        for device in on_gpu:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return StagedTensors(dict(self._views), events)

    def _is_pinned(self) -> bool:
        return self._buffer is not None and self._buffer.is_pinned()

    def _allocate(
        self, layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...], *, pin: bool
    ) -> None:
        self._buffer, self._views = None, {}  # free the old buffer before the new one
        offsets, total = [], 0
        for _, dtype, shape in layout:
            offsets.append(total)
            total += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        for (name, dtype, shape), offset in zip(layout, offsets, strict=True):
            raw = buffer[offset : offset + math.prod(shape) * dtype.itemsize]
            self._views[name] = raw.view(dtype).view(shape)
        self._buffer, self._layout = buffer, layout
