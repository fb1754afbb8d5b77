"""Reading checkpoint files: every chunk is checked against its checksum, on every core
at once, before any byte is parsed or copied.

So a damaged file never reaches the caller's tensors, and a mismatch (names, shapes,
dtypes against ``out=``) is found before anything is copied. Copying while hashing was
tried: no faster from 512 MiB up on the 2-core dev VM, and 30% slower at 64 MiB, where
torch's own parallel copy then competes with the hashing threads.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from hardtrain.checkpoint._format import checksum
from hardtrain.checkpoint._limits import CapError, load_json
from hardtrain.checkpoint._safetensors import TensorSpec, parse_safetensors, tensor_view


def check_chunks(data: Any, chunks: Sequence[str], chunk_bytes: int) -> str | None:
    """Verify ``data`` against its chunk checksums on every core (xxhash releases the GIL).
    None when all match; otherwise what differs, for the error message."""
    view = memoryview(data)
    offsets = range(0, len(view), chunk_bytes)
    if len(offsets) != len(chunks):
        return f"{len(offsets)} chunks of {chunk_bytes} bytes, manifest lists {len(chunks)}"

    def check(index: int) -> str | None:
        start = offsets[index]
        piece = view[start : start + chunk_bytes]
        actual = checksum(piece)
        if actual != chunks[index]:
            end = start + len(piece)
            return f"bytes {start}..{end}: xxh3_128 {actual}, manifest says {chunks[index]}"
        return None

    if len(chunks) <= 1:
        results = [check(i) for i in range(len(chunks))]
    else:
        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            results = list(pool.map(check, range(len(chunks))))
    return next((r for r in results if r is not None), None)


# What a file's check returns when it fails: (reason, detail), as in a FileProblem.
Problem = tuple[str, str]


def content_problem(error: Exception) -> Problem:
    """A file whose bytes match its manifest but whose content does not hold: what the
    parsers (or torch) raised, on one line. Over a cap, the cap and the value."""
    if isinstance(error, MemoryError):  # this machine's trouble, not the checkpoint's
        raise error
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= 300 else f"{text[:297]}..."
    if isinstance(error, CapError):
        return "over cap", text
    return "malformed", text if type(error) is ValueError else f"{type(error).__name__}: {text}"


def parse_state(data: bytes) -> dict[str, Any]:
    """A rank's JSON state, nested at most MAX_DEPTH deep: load and verify both parse it
    with this."""
    value = load_json(data)
    if not isinstance(value, dict):
        raise ValueError("state is not a JSON object")
    return value


def read_json(
    view: memoryview, chunks: Sequence[str], chunk_bytes: int
) -> tuple[dict[str, Any] | None, Problem | None]:
    """(the state, None), or (None, what is wrong: its checksums, or its content)."""
    bad = check_chunks(view, chunks, chunk_bytes)
    if bad is not None:
        return None, ("wrong checksum", bad)
    try:
        return parse_state(bytes(view)), None
    except Exception as e:
        return None, content_problem(e)


@dataclass
class TensorRead:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    problem: Problem | None = None  # its checksums, or its content
    mismatch: list[str] = field(default_factory=list)  # how the file does not fit out=


def read_tensors(
    view: memoryview,
    chunks: Sequence[str],
    chunk_bytes: int,
    out: Mapping[str, torch.Tensor] | None,
) -> TensorRead:
    """The verified tensors of a safetensors file: copied into ``out`` (in place), or new
    ones. Nothing is copied unless the whole file verifies, parses and fits ``out``. What
    goes wrong while copying (the device, the memory) is raised: not the file's fault."""
    bad = check_chunks(view, chunks, chunk_bytes)
    if bad is not None:
        return TensorRead(problem=("wrong checksum", bad))
    try:
        specs, data_start = parse_safetensors(view)
        with warnings.catch_warnings():  # the mapping is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(view, dtype=torch.uint8)
        sources = {name: tensor_view(data, spec, data_start) for name, spec in specs.items()}
    except Exception as e:
        return TensorRead(problem=content_problem(e))
    if out is not None:
        mismatch = describe_mismatch(specs, out)
        if mismatch:
            return TensorRead(mismatch=mismatch)
    tensors = {}
    with torch.no_grad():
        while sources:  # each view goes once copied: a million tensors are not held twice
            name, source = sources.popitem()
            tensors[name] = out[name].copy_(source) if out is not None else source.clone()
    return TensorRead(tensors)


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
