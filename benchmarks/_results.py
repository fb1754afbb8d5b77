"""The ``--json`` file of the step benchmarks (step_fixed_cost.py, step_overhead.py), read by
compare_revisions.py. One object:

    {"benchmark": "step_overhead", "hardtrain": "<hardtrain.__file__ of the run>",
     "argv": [...], "torch": "2.x", "context": {...},
     "rows": [{"name": "~2 ms: fit, default policy (every 30min)",
               "median_s": ..., "min_s": ...,      # per-step seconds over repetitions
               "values_s": [...],                  # one per repetition, in order
               "ratio_vs_plain": ...,              # median of ratios_vs_plain; null for the
               "ratios_vs_plain": [...],           # plain loop: row / plain loop of the same
               ...}]}                              # repetition, one per repetition

Row names are unique within a file; a row may carry more fields (the benchmark's own).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

import hardtrain


def result_row(name: str, values_s: Sequence[float], ratios: Sequence[float] | None = None,
               **extra: Any) -> dict[str, Any]:
    """One row: ``values_s`` per-step seconds, ``ratios`` row / plain loop, both one per
    repetition (``ratios`` None for the plain loop itself)."""
    return {
        "name": name,
        "median_s": statistics.median(values_s),
        "min_s": min(values_s),
        "values_s": list(values_s),
        "ratio_vs_plain": None if ratios is None else statistics.median(ratios),
        "ratios_vs_plain": None if ratios is None else list(ratios),
        **extra,
    }


def write_json(path: str, benchmark: str, rows: list[dict[str, Any]],
               **context: Any) -> None:
    """Writes the rows, with which hardtrain was imported (compare_revisions.py checks it)."""
    document = {
        "benchmark": benchmark,
        "hardtrain": hardtrain.__file__,
        "argv": sys.argv[1:],
        "torch": torch.__version__,
        "context": context,
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
