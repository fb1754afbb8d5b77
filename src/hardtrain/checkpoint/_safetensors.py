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

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def parse_safetensors(buf: memoryview) -> tuple[dict[str, TensorSpec], int]:
    """The tensors a safetensors buffer holds, and where its data starts.

    Checks what the safetensors library checks: header size and JSON, known dtypes,
    byte ranges that match the shapes and tile the data section exactly.
    """
    if len(buf) < 8:
        raise ValueError(f"{len(buf)} bytes, shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", buf[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(buf):
        raise ValueError(f"header length {header_len} does not fit in {len(buf)} bytes")
    try:
        header = json.loads(bytes(buf[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    specs: dict[str, TensorSpec] = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tensor {name!r}: bad header entry ({e!r})") from None
        if end - start != math.prod(shape) * dtype.itemsize or start < 0:
            raise ValueError(f"tensor {name!r}: byte range {start}..{end} does not fit {shape}")
        specs[name] = TensorSpec(dtype, shape, start, end)
    covered = 0
    for spec in sorted(specs.values(), key=lambda s: (s.start, s.end)):
        if spec.start != covered:
            raise ValueError(f"data section has a gap or overlap at byte {covered}")
        covered = spec.end
    if data_start + covered != len(buf):
        raise ValueError(f"data section is {len(buf) - data_start} bytes, header says {covered}")
    return specs, data_start


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
