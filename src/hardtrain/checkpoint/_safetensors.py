"""The safetensors format, read and written by hardtrain itself: parsed from a buffer
without pickle or copies, and written from the tensors' memory in pieces (so that an
abandoned save stops mid-file). Files are plain safetensors: the library reads them."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hardtrain.checkpoint._format import DTYPES
from hardtrain.checkpoint._limits import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    CapError,
    JsonShape,
    check_cap,
    load_json,
)

_MAX_ELEMENTS = 1 << 62  # of a tensor: torch's strides must not overflow (zero-size ones)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def header_length(head: bytes | memoryview, file_size: int) -> int:
    """The JSON header's length, from a file's first 8 bytes, checked against the cap and
    the file's size."""
    if file_size < 8 or len(head) < 8:
        raise ValueError(f"{file_size} bytes, shorter than a safetensors header")
    (length,) = struct.unpack("<Q", head[:8])
    if 8 + length > file_size:  # a claim the file cannot back: garbage, not a big header
        raise ValueError(f"header length {length} does not fit in {file_size} bytes")
    check_cap("header of", length, MAX_HEADER_BYTES, " bytes")
    return int(length)


def parse_safetensors(
    buf: bytes | memoryview, file_size: int | None = None
) -> tuple[dict[str, TensorSpec], int]:
    """The tensors a safetensors file holds, and where its data starts: ``buf`` holds the
    whole file, or at least its header when ``file_size`` says how long the file is.

    Checks what the safetensors library checks (header size and JSON, known dtypes, byte
    ranges that match the shapes and tile the data section exactly), and what a file from
    anyone must not claim: more than MAX_TENSORS tensors, JSON nested deeper than any
    header, dimensions that are not counts. ValueError (CapError over a cap) says which.
    """
    file_size = len(buf) if file_size is None else file_size
    header_len = header_length(buf, file_size)
    if 8 + header_len > len(buf):
        raise ValueError(f"{len(buf)} bytes given, the header takes {8 + header_len}")
    header = load_json(bytes(buf[8 : 8 + header_len]), _check_header_shape)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    check_cap("header lists", len(header), MAX_TENSORS, " tensors")
    data_start = 8 + header_len
    specs = {name: _spec(name, info) for name, info in header.items()}
    covered = 0
    for spec in sorted(specs.values(), key=lambda s: (s.start, s.end)):
        if spec.start != covered:
            raise ValueError(f"data section has a gap or overlap at byte {covered}")
        covered = spec.end
    if data_start + covered != file_size:
        raise ValueError(f"data section is {file_size - data_start} bytes, header says {covered}")
    return specs, data_start


def _check_header_shape(shape: JsonShape) -> None:
    """Before the header is parsed: at most MAX_TENSORS entries (and ``__metadata__``),
    and no more arrays and objects than they take (an entry, its shape, its offsets)."""
    if shape.members > MAX_TENSORS + 1:
        raise CapError(f"header lists {shape.members} entries, over the cap of {MAX_TENSORS} "
                       "tensors (and __metadata__)")
    check_cap(f"header of {shape.members} entries holds", shape.containers,
              3 * shape.members + 2, " arrays and objects")


def _spec(name: str, info: Any) -> TensorSpec:
    def bad(why: str) -> ValueError:
        shown = name if len(name) <= 200 else f"{name[:197]}..."
        return ValueError(f"tensor {shown!r}: {why}")

    if not isinstance(info, dict):
        raise bad("its entry is not an object")
    name_of_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = DTYPES.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    if dtype is None:
        raise bad(f"unknown dtype {str(name_of_dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad("shape is not a list of counts")
    if len(shape) > MAX_DIMS:
        raise CapError(f"tensor {name[:200]!r} has {len(shape)} dimensions, over the cap of "
                       f"{MAX_DIMS}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise bad("data_offsets is not a pair of counts")
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise bad(f"shape {shape} is larger than any tensor")
    start, end = offsets
    if end - start != math.prod(shape) * dtype.itemsize:
        raise bad(f"byte range {start}..{end} does not fit {shape}")
    return TensorSpec(dtype, tuple(shape), start, end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_safetensors(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[memoryview]]:
    """A safetensors file as its header and the tensors' bytes, in order, without copying
    them (CPU, contiguous tensors): what ``safetensors.torch.save_file`` writes, given
    back in pieces so that a writer can stop between them. Larger elements first, then
    by name, so that every tensor starts aligned to its element size."""
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    names = {dtype: name for name, dtype in DTYPES.items()}
    header: dict[str, Any] = {}
    pieces: list[memoryview] = []
    offset = 0
    for name in order:
        t = tensors[name].detach()
        size = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        if size:
            pieces.append(t.reshape(-1).view(torch.uint8).numpy().data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    check_cap("the header would be", len(text), MAX_HEADER_BYTES, " bytes")  # unreadable
    return struct.pack("<Q", len(text)) + text, pieces


def tensor_view(data: torch.Tensor, spec: TensorSpec, data_start: int) -> torch.Tensor:
    """A tensor over ``data`` (a uint8 tensor of the whole file) without copying, where the
    alignment allows; a copy otherwise."""
    raw = data[data_start + spec.start : data_start + spec.end]
    if raw.numel() == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    try:
        return raw.view(spec.dtype).view(spec.shape)
    except RuntimeError:  # misaligned for this dtype
        return raw.clone().view(spec.dtype).view(spec.shape)
