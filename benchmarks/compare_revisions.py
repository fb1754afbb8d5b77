"""A step benchmark before and after a change to hardtrain: interleaved runs, one table.

    .venv/bin/python benchmarks/compare_revisions.py --against REV [--rounds N] \\
        BENCHMARK.py [benchmark args...]

    .venv/bin/python benchmarks/compare_revisions.py --against HEAD \\
        benchmarks/step_fixed_cost.py --steps 1000 --repeats 3
    .venv/bin/python benchmarks/compare_revisions.py --against HEAD --rounds 3 \\
        benchmarks/step_overhead.py --quick

"before" is REV's ``src/``, exported with ``git archive REV src | tar -x`` into a temporary
folder (no worktree; nothing in the repository changes) and put first on PYTHONPATH;
"after" is the working tree's ``src/`` (or ``--after-src``). The benchmark script is the
working tree's copy on both sides: only the library differs. Each round runs it once per
side (the order alternates), with ``--json``; each run's JSON says which hardtrain it
imported, and a run that imported the wrong one is an error. The table pools every
repetition of all rounds: medians of per-step seconds, after / before, and each side's
median ratio to the plain loop of the same repetition. The benchmarks' own output goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def export_src(rev: str, dest: Path) -> Path:
    """REV's src/ under ``dest`` (``git archive REV src | tar -x -C dest``)."""
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", rev, "src"],
                               stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=False)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        sys.exit(f"could not export src/ of {rev!r}")
    return dest / "src"


def run_side(src: Path, script: str, args: list[str], json_path: Path) -> dict[str, Any]:
    """One run of the benchmark with ``src`` first on PYTHONPATH; its JSON document."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, script, *args, "--json", str(json_path)]
    if subprocess.run(command, env=env, stdout=sys.stderr, check=False).returncode != 0:
        sys.exit(f"benchmark failed with PYTHONPATH={src}: {' '.join(command)}")
    result: dict[str, Any] = json.loads(json_path.read_text())
    imported = Path(result["hardtrain"]).resolve()
    if not imported.is_relative_to(src.resolve()):
        sys.exit(f"the benchmark imported {imported}, not the hardtrain in {src}")
    return result


def pooled(runs: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """Row name -> the per-repetition values under ``key`` of every run, in row order."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            values.setdefault(row["name"], []).extend(row[key] or [])
    return values


def seconds(value: float) -> str:
    return f"{value * 1e6:.1f} us" if value < 1e-3 else f"{value * 1e3:.3f} ms"


def median_or_dash(values: list[float], fmt: str = "{:.4f}x") -> str:
    return fmt.format(statistics.median(values)) if values else "—"


def print_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    times = {"before": pooled(before, "values_s"), "after": pooled(after, "values_s")}
    ratios = {"before": pooled(before, "ratios_vs_plain"),
              "after": pooled(after, "ratios_vs_plain")}
    print("| row | before median | after median | after / before "
          "| before vs plain | after vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, old in times["before"].items():
        new = times["after"].get(name)
        if not new:
            print(f"| {name} | {seconds(statistics.median(old))} | (no row) | | | |")
            continue
        change = statistics.median(new) / statistics.median(old)
        print(f"| {name} | {seconds(statistics.median(old))} | {seconds(statistics.median(new))} "
              f"| {change:.4f}x | {median_or_dash(ratios['before'][name])} "
              f"| {median_or_dash(ratios['after'].get(name, []))} |")
    for name in times["after"].keys() - times["before"].keys():
        print(f"| {name} | (no row) | {seconds(statistics.median(times['after'][name]))} | | | |")


def print_workloads(runs: dict[str, list[dict[str, Any]]]) -> None:
    """step_overhead calibrates its MLP in each run: say so where runs timed different
    models (then only the ratios to the plain loop compare)."""
    shapes: dict[str, dict[str, set[str]]] = {}  # scale -> side -> "width x batch"
    for side, side_runs in runs.items():
        for run in side_runs:
            for row in run["rows"]:
                if "width" in row:
                    by_side = shapes.setdefault(row["scale"], {"before": set(), "after": set()})
                    by_side[side].add(f"width {row['width']} batch {row['batch']}")
    for scale, by_side in shapes.items():
        if len(by_side["before"] | by_side["after"]) > 1:
            print(f"{scale}: the runs calibrated different MLPs (before: "
                  f"{', '.join(sorted(by_side['before']))}; after: "
                  f"{', '.join(sorted(by_side['after']))}): compare the ratios to the plain "
                  "loop, not the times.")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s --against REV [--rounds N] [--after-src DIR] BENCHMARK.py [args...]")
    parser.add_argument("--against", required=True, metavar="REV",
                        help="the revision to compare with (its src/ is 'before')")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each side, interleaved (default: %(default)s)")
    parser.add_argument("--after-src", type=Path, default=REPO / "src", metavar="DIR",
                        help="the library for 'after' (default: the working tree's src/); "
                        "e.g. another export of REV, to see the noise of an A/A comparison")
    parser.add_argument("script", metavar="BENCHMARK.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short",
                             f"{args.against}^{{commit}}"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if not commit:
        parser.error(f"--against: {args.against!r} is not a commit")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="hardtrain-compare-") as tmp:
        sources = {"before": export_src(commit, Path(tmp)), "after": args.after_src}
        for n in range(args.rounds):
            order = ["before", "after"] if n % 2 == 0 else ["after", "before"]
            for side in order:
                print(f"## round {n + 1}/{args.rounds}, {side} ({sources[side]})",
                      file=sys.stderr, flush=True)
                json_path = Path(tmp) / f"{side}-{n}.json"
                runs[side].append(run_side(sources[side], args.script, args.args, json_path))
        imported = {side: runs[side][0]["hardtrain"] for side in runs}
    print(f"# {' '.join([Path(args.script).name, *args.args])}\n\n"
          f"before: {args.against}{'' if commit == args.against else f' ({commit})'}, after: "
          f"{args.after_src}; {args.rounds} rounds, "
          f"alternating; {time.perf_counter() - started:.0f} s. hardtrain imported from "
          f"{imported['before']} (before), {imported['after']} (after).\n")
    print_table(runs["before"], runs["after"])
    print("\nMedians over every repetition of all rounds; \"vs plain\": the median of row / "
          "plain loop of the same repetition.")
    print_workloads(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
