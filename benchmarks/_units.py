"""Sizes on the command line and in tables, shared by the benchmarks."""

from __future__ import annotations

import argparse
import re

KIB, MIB, GIB = 2**10, 2**20, 2**30
_UNITS = {
    "": 1, "B": 1, "K": KIB, "KB": 10**3, "KIB": KIB, "M": MIB, "MB": 10**6, "MIB": MIB,
    "G": GIB, "GB": 10**9, "GIB": GIB,
}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 64MiB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_bytes(num_bytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"
