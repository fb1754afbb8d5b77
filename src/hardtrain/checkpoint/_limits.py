"""What hardtrain reads from a checkpoint, at most: the caps, and JSON parsed only once
its size and shape are known to fit them.

A checkpoint's files are only as trustworthy as whoever can write the run directory, and
XXH3 is no seal (anyone can recompute it). So every size or count a file claims, and
that would make the reader allocate, is checked against a cap before the allocation;
a file over one is damage, refused with the cap and the value. The caps are far above
any real checkpoint (docs/checkpoints.md, "Threat model and caps", has the figures), and
saving refuses to write past them: a run never writes a checkpoint it would refuse.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

# A manifest holds one line of 40 bytes per 4 MiB chunk (~10 MiB per TiB of checkpoint)
# and ~150 bytes per file: 64 MiB describes ~6.4 TiB, or ~450,000 files.
MAX_MANIFEST_BYTES = 64 << 20
# The safetensors library's own limit (MAX_HEADER_SIZE): its readers refuse more.
MAX_HEADER_BYTES = 100_000_000
MAX_TENSORS = 1 << 19  # in one safetensors file
MAX_DIMS = 64  # of one tensor
MAX_DEPTH = 64  # nesting of any JSON hardtrain reads (arrays and objects)
MAX_WORLD_SIZE = 1 << 20  # ranks that a manifest may claim
MAX_FILES = 1 << 21  # files that a manifest may list: two per rank at MAX_WORLD_SIZE

_SCAN_PIECE = 1 << 20  # the scan's temporaries take ~10 times this
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"{}[]:')
_STEP = np.zeros(256, np.int8)  # what each byte does to the nesting depth
_STEP[list(b"{[")] = 1
_STEP[list(b"}]")] = -1


class CapError(ValueError):
    """A file claims more than hardtrain reads: the message gives the value and the cap."""


def check_cap(what: str, value: int, cap: int, unit: str = "") -> None:
    if value > cap:
        raise CapError(f"{what} {value}{unit}, over the cap of {cap}{unit}")


class JsonShape(NamedTuple):
    depth: int  # nesting of arrays and objects
    members: int  # of the top-level object
    containers: int  # arrays and objects in all


def json_shape(data: bytes) -> JsonShape:
    """The shape of a JSON text, counted outside its strings, without parsing it: the
    text cut down to its quotes, brackets and colons, then a few passes of numpy over
    pieces of it. So a hostile text is refused before it allocates anything (0.3 s for a
    90 MB safetensors header)."""
    if b"\\" in data:  # escapes out first: every quote left opens or closes a string
        data = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    raw = np.frombuffer(data.translate(None, _NOT_STRUCTURE), np.uint8)
    depth = deepest = members = containers = 0
    inside = np.uint8(0)  # 1 while in a string, its opening quote included
    for start in range(0, len(raw), _SCAN_PIECE):
        piece = raw[start : start + _SCAN_PIECE]
        parity = np.cumsum(piece == ord('"'), dtype=np.uint8)  # wraps: the parity stays
        parity += inside
        parity &= 1
        inside = parity[-1]
        in_string = parity.view(bool)
        step = _STEP[piece]
        step[in_string] = 0
        containers += int(np.count_nonzero(step == 1))
        level = np.cumsum(step, dtype=np.int32)
        level += depth
        deepest = max(deepest, int(level.max()))
        depth = int(level[-1])
        members += int(np.count_nonzero((piece == ord(":")) & (level == 1) & ~in_string))
    return JsonShape(deepest, members, containers)


def load_json(data: bytes, check: Callable[[JsonShape], None] | None = None) -> Any:
    """Parse UTF-8 JSON nested at most MAX_DEPTH deep, whose shape passes ``check``
    (which raises CapError), before it is parsed. CapError over a cap, ValueError for
    anything else wrong with it."""
    if json.detect_encoding(data) != "utf-8":
        raise ValueError("not UTF-8 JSON")
    shape = json_shape(data)
    check_cap("nested", shape.depth, MAX_DEPTH, " levels deep")
    if check is not None:
        check(shape)
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of 5000 digits
        raise ValueError(f"not JSON ({e})") from None
    except RecursionError:  # unreachable after the depth check; never a crash
        raise CapError(f"nested too deep to parse (cap {MAX_DEPTH} levels)") from None
