"""Reading checkpoint files: bytes are checked against their chunk checksums and copied
into tensors in the same pass, a chunk per core at a time.

Hashing first and copying after would read the file twice; on a 2-core VM that alone
costs about as much as the copy. Instead each chunk is hashed and, once it matches, its
bytes are copied while they are still in cache. The header's chunks are verified before
the header is parsed, and names, shapes and dtypes are checked against ``out=`` before any
byte is copied, so only a checksum failure in the tensor data can leave ``out=`` partly
written; the caller is told (``TensorRead.touched``) and says so in its error.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from hardtrain.checkpoint._format import TensorSpec, checksum, parse_safetensors, tensor_view


def check_chunks(
    data: Any,
    chunks: Sequence[str],
    chunk_bytes: int,
    *,
    indices: Sequence[int] | None = None,
    then: Callable[[int, int], None] | None = None,
    verified: Sequence[int] = (),
) -> str | None:
    """Verify ``data`` against its chunk checksums on every core (xxhash releases the GIL),
    calling ``then(start, end)`` for each chunk that matches (those in ``verified`` are
    not hashed again). None when all match; otherwise what differs, for the message."""
    view = memoryview(data)
    offsets = range(0, len(view), chunk_bytes)
    if len(offsets) != len(chunks):
        return f"{len(offsets)} chunks of {chunk_bytes} bytes, manifest lists {len(chunks)}"

    def check(index: int) -> str | None:
        start = offsets[index]
        piece = view[start : start + chunk_bytes]
        actual = chunks[index] if index in verified else checksum(piece)
        if actual != chunks[index]:
            end = start + len(piece)
            return f"bytes {start}..{end}: xxh3_128 {actual}, manifest says {chunks[index]}"
        if then is not None:
            then(start, start + len(piece))
        return None

    todo = range(len(chunks)) if indices is None else indices
    if len(todo) <= 1:
        results = [check(i) for i in todo]
    else:
        with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
            results = list(pool.map(check, todo))
    return next((r for r in results if r is not None), None)


def read_json(view: memoryview, chunks: Sequence[str], chunk_bytes: int) -> tuple[Any, str | None]:
    """(the JSON object, None), or (None, the checksum problem)."""
    bad = check_chunks(view, chunks, chunk_bytes)
    if bad is not None:
        return None, bad
    value = json.loads(bytes(view))
    if not isinstance(value, dict):
        raise ValueError("state is not a JSON object")
    return value, None


@dataclass
class TensorRead:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    problem: str | None = None  # a checksum problem
    mismatch: list[str] = field(default_factory=list)  # how the file does not fit out=
    touched: bool = False  # out= got bytes from a file that then failed verification


def read_tensors(
    view: memoryview,
    chunks: Sequence[str],
    chunk_bytes: int,
    out: Mapping[str, torch.Tensor] | None,
) -> TensorRead:
    """The verified tensors of a safetensors file: into ``out`` (in place) or new ones."""
    if len(view) < 8:
        raise ValueError(f"{len(view)} bytes, shorter than a safetensors header")
    header_end = min(8 + struct.unpack("<Q", view[:8])[0], len(view))
    header_chunks = range(-(-header_end // chunk_bytes))
    bad = check_chunks(view, chunks, chunk_bytes, indices=header_chunks)
    if bad is not None:
        return TensorRead(problem=bad)
    specs, data_start = parse_safetensors(view)
    if out is not None:
        mismatch = describe_mismatch(specs, out)
        if mismatch:
            return TensorRead(mismatch=mismatch)
    with warnings.catch_warnings():  # the mapping is read-only; it is only read
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(view, dtype=torch.uint8)
    with torch.no_grad():
        targets = {
            name: out[name] if out is not None else torch.empty(spec.shape, dtype=spec.dtype)
            for name, spec in specs.items()
        }
        copy = _RangeCopier(data, data_start, specs, targets)
        bad = check_chunks(view, chunks, chunk_bytes, then=copy, verified=header_chunks)
        if bad is not None:
            return TensorRead(problem=bad, touched=out is not None and copy.num_ranges > 0)
        for name in copy.left_over:  # GPU or strided targets: copied once all is verified
            targets[name].copy_(tensor_view(data, specs[name], data_start))
    return TensorRead(targets)


class _RangeCopier:
    """Copies the file bytes in [start, end) into the CPU, contiguous targets they belong
    to; other targets are ``left_over`` for a plain copy later."""

    def __init__(
        self,
        data: torch.Tensor,
        data_start: int,
        specs: Mapping[str, TensorSpec],
        targets: Mapping[str, torch.Tensor],
    ) -> None:
        self._data = data
        self.left_over: list[str] = []
        ranges = []
        for name, spec in specs.items():
            target = targets[name]
            if target.device.type != "cpu" or not target.is_contiguous():
                self.left_over.append(name)
            elif spec.end > spec.start:
                raw = target.reshape(-1).view(torch.uint8)
                ranges.append((data_start + spec.start, data_start + spec.end, raw))
        ranges.sort(key=lambda r: r[0])
        self._ranges = ranges
        self._starts = [r[0] for r in ranges]
        self.num_ranges = len(ranges)

    def __call__(self, start: int, end: int) -> None:
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while i < len(self._ranges) and self._ranges[i][0] < end:
            first, last, raw = self._ranges[i]
            lo, hi = max(first, start), min(last, end)
            if lo < hi:
                raw[lo - first : hi - first].copy_(self._data[lo:hi])
            i += 1


def describe_mismatch(
    specs: Mapping[str, TensorSpec], out: Mapping[str, torch.Tensor]
) -> list[str]:
    missing = sorted(set(out) - set(specs))
    unexpected = sorted(set(specs) - set(out))
    problems = []
    if missing:
        problems.append(f"missing in checkpoint: {', '.join(missing)}")
    if unexpected:
        problems.append(f"not in out=: {', '.join(unexpected)}")
    for name in sorted(set(specs) & set(out)):
        spec, target = specs[name], out[name]
        if tuple(target.shape) != spec.shape or target.dtype != spec.dtype:
            problems.append(
                f"{name}: checkpoint has {spec.dtype} {list(spec.shape)}, "
                f"out= has {target.dtype} {list(target.shape)}"
            )
    return problems
