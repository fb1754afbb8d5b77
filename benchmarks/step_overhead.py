"""Step overhead benchmark: HardenedTrainer.fit against the same training by hand.

Trains one MLP (AdamW, a LambdaLR warm-up schedule, a DataLoader over a TensorDataset)
three ways, at about 2 ms and about 50 ms per step:

* plain: a hand-written loop (zero_grad(set_to_none=True), next batch, forward, backward,
  optimizer step, scheduler step) over the same kind of DataLoader;
* fit with the default ``CheckpointPolicy`` (every 30min: only the final checkpoint);
* fit saving every N steps with ``async_save``, so the cost of saving shows.

The MLP's width (then batch) is calibrated to the device first. Runs are interleaved
(plain, fit, fit every N; the order rotates each repetition), each with a fresh model and
optimizer and a fresh run_dir in a temporary folder, after one discarded warm-up run.
Steps are stamped from inside ``step_fn`` (on CUDA after a synchronize at both ends of the
timed block), so fit's start-up and final checkpoint fall outside the per-step figure and
are reported apart. A run's timed block (after its warm-up steps) is cut into chunks of N
steps; its per-step time is its fastest chunk's wall time / N: other processes only ever
add time, and on a small shared machine a burst of their load spoils a chunk, not the run.
Tables show medians over repetitions and ratios against the plain loop of the same
repetition, then the targets (reported, never enforced):

* fit / plain per step <= 1.03 at ~2 ms and <= 1.01 at ~50 ms;
* on CUDA, no host-device synchronisation added per step (counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` over a block of steps of each loop).

    python benchmarks/step_overhead.py            # full run, 2-5 min on 2 CPU cores
    python benchmarks/step_overhead.py --quick    # smoke run, under 30 s
    python benchmarks/step_overhead.py --json PATH  # also write the figures (_results.py)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _results import result_row, write_json
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import hardtrain as ht

# Row names.
PLAIN = "plain loop"
FIT = "fit, default policy (every 30min)"
FIT_NO_NAN = "fit, default policy, nan=None"

DEPTH = 4  # hidden layers of the MLP
CLASSES = 10
MAX_WIDTH = 4096  # calibration grows the batch beyond this
DATA_BYTES = 256 * 2**20  # at most this much input data per workload
SYNC_STEPS = 50  # steps over which CUDA syncs are counted


@dataclass(frozen=True)
class Shape:
    width: int
    batch: int


@dataclass(frozen=True)
class Scale:
    """One step time to measure at."""

    name: str
    target_s: float  # the plain step time to calibrate the MLP to
    max_ratio: float  # the target: fit / plain per step <= this
    warmup: int  # steps of each run before the timed block
    steps: int  # steps in the timed block, a multiple of every_steps
    every_steps: int  # for the "save every N steps" row; > warmup

    @property
    def chunk(self) -> int:
        """Steps per chunk of the timed block (a run's figure is its fastest chunk): each
        chunk of the "save every N steps" row holds exactly one save."""
        return self.every_steps

    @property
    def rows(self) -> list[str]:
        return [PLAIN, FIT, FIT_NO_NAN, self.every_row]

    @property
    def every_row(self) -> str:
        return f"fit, every_steps={self.every_steps}, async"


FULL = (
    Scale("~2 ms", 0.002, 1.03, warmup=50, steps=600, every_steps=100),
    Scale("~50 ms", 0.050, 1.01, warmup=5, steps=60, every_steps=15),
)
QUICK = (
    Scale("~2 ms", 0.002, 1.03, warmup=10, steps=100, every_steps=20),
    Scale("~50 ms", 0.050, 1.01, warmup=2, steps=8, every_steps=4),
)


# ---------------------------------------------------------------------------- workload


@dataclass
class Workload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]]


def warmup_lr(step: int) -> float:
    return min(1.0, (step + 1) / 100)


def make_data(shape: Shape) -> TensorDataset:
    """Whole batches, at most ``DATA_BYTES`` of inputs (4 to 64 batches an epoch)."""
    num_batches = max(4, min(64, DATA_BYTES // (shape.batch * shape.width * 4)))
    n = num_batches * shape.batch
    return TensorDataset(torch.randn(n, shape.width), torch.randint(CLASSES, (n,)))


def build(shape: Shape, data: TensorDataset, device: torch.device) -> Workload:
    """A fresh model, optimizer, schedule and loader, the same for every run."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(shape.width, shape.width), nn.GELU()]
    layers.append(nn.Linear(shape.width, CLASSES))
    model = nn.Sequential(*layers).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = LambdaLR(optimizer, warmup_lr)
    # One indexing call per batch (batch_size=None, a batch sampler as the sampler): the
    # per-sample fetch and collate of the usual loader would only dilute the overhead.
    sampler = BatchSampler(RandomSampler(data), shape.batch, drop_last=True)
    loader = DataLoader(data, batch_size=None, sampler=sampler,
                        pin_memory=device.type == "cuda")
    return Workload(model, optimizer, scheduler, loader)


class StepProbe:
    """The step_fn of both loops: the forward pass and the loss, with a timestamp at the
    start of every step. ``block`` = (first, last) step index of the timed block: on CUDA
    the device is synchronised just before those two timestamps, or, with
    ``count_syncs``, sync debug mode is switched on at the first and off at the last."""

    def __init__(self, model: nn.Module, device: torch.device, block: tuple[int, int],
                 *, count_syncs: bool = False) -> None:
        self.model = model
        self.device = device
        self.block = block
        self.count_syncs = count_syncs
        self.marks: list[float] = []

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        index = len(self.marks)
        if index in self.block and self.device.type == "cuda":
            if self.count_syncs:
                torch.cuda.set_sync_debug_mode("warn" if index == self.block[0] else 0)
            else:
                torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return F.cross_entropy(self.model(x), y)


def train_plain(work: Workload, step_fn: StepProbe, num_steps: int) -> None:
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(work.loader)
    for _ in range(num_steps):
        work.optimizer.zero_grad(set_to_none=True)
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(work.loader)
            batch = next(batches)
        loss = step_fn(batch)
        loss.backward()
        work.optimizer.step()
        work.scheduler.step()


def train_fit(work: Workload, step_fn: StepProbe, num_steps: int, run_dir: str,
              policy: ht.CheckpointPolicy, *, nan: bool = True) -> None:
    trainer = ht.HardenedTrainer(work.model, work.optimizer, work.loader, run_dir,
                                 scheduler=work.scheduler, checkpoint=policy,
                                 **({} if nan else {"nan": None}))
    result = trainer.fit(step_fn, num_steps)
    if result.num_steps != num_steps:
        raise RuntimeError(f"fit ran {result.num_steps} steps, expected {num_steps}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ measurements


@dataclass
class RunTimes:
    per_step_s: float  # the timed block's fastest chunk: its wall time / its steps
    median_chunk_s: float  # the same for its median chunk
    startup_s: float  # from the call to the first step's start
    finish_s: float  # from the last step's start to the return, less one step


@dataclass
class Bench:
    """Runs the loops of one scale; each run gets a fresh workload and run_dir."""

    scale: Scale
    shape: Shape
    data: TensorDataset
    device: torch.device
    parent: str  # run_dirs go in here

    def policy(self, row: str) -> ht.CheckpointPolicy:
        if row in (FIT, FIT_NO_NAN):
            return ht.CheckpointPolicy()
        return ht.CheckpointPolicy(every_steps=self.scale.every_steps, async_save=True)

    def run(self, row: str, *, warmup: int, steps: int, count_syncs: bool = False
            ) -> tuple[StepProbe, float, float]:
        """One run of ``warmup + steps + 1`` steps (the block ends at the last step's
        start); the probe with its marks and the wall times around the call."""
        work = build(self.shape, self.data, self.device)
        probe = StepProbe(work.model, self.device, (warmup, warmup + steps),
                          count_syncs=count_syncs)
        num_steps = warmup + steps + 1
        run_dir = tempfile.mkdtemp(prefix="run-", dir=self.parent)
        gc.collect()
        synchronize(self.device)
        try:
            start = time.perf_counter()
            if row == PLAIN:
                train_plain(work, probe, num_steps)
            else:
                train_fit(work, probe, num_steps, run_dir, self.policy(row),
                          nan=row != FIT_NO_NAN)
            synchronize(self.device)
            end = time.perf_counter()
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return probe, start, end

    def time_run(self, row: str) -> RunTimes:
        """Per step: the block's fastest chunk. Other processes only ever add time, and a
        burst of their load spoils a chunk, not the run; every chunk has the same number of
        steps (and of saves) in it."""
        warmup, steps, chunk = self.scale.warmup, self.scale.steps, self.scale.chunk
        probe, start, end = self.run(row, warmup=warmup, steps=steps)
        marks = probe.marks
        chunks = [(marks[i + chunk] - marks[i]) / chunk
                  for i in range(warmup, warmup + steps, chunk)]
        per_step = min(chunks)
        return RunTimes(per_step, statistics.median(chunks), marks[0] - start,
                        max(0.0, end - marks[-1] - per_step))

    def count_syncs(self, row: str) -> tuple[float, Counter[str]]:
        """Host-device synchronisations per step over ``SYNC_STEPS`` steps, and where
        (file:line of the Python frame that caused them)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.run(row, warmup=3, steps=SYNC_STEPS, count_syncs=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where = Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
        return len(syncs) / SYNC_STEPS, where


def calibrate(target_s: float, start: Shape, device: torch.device, parent: str
              ) -> tuple[Shape, float]:
    """The MLP shape whose plain step takes about ``target_s`` (within 15%, or the closest
    found): width first (multiples of 32, up to MAX_WIDTH), then the batch."""
    shape = start
    chunk = max(1, min(20, round(0.04 / target_s)))  # 5 chunks, about 0.2 s a try
    scale = Scale("calibration", target_s, 1.0, warmup=3, steps=5 * chunk, every_steps=chunk)
    tried: dict[Shape, float] = {}
    for _ in range(6):
        bench = Bench(scale, shape, make_data(shape), device, parent)
        # The faster of two tries: a burst of other load must not shrink the model.
        per_step = min(bench.time_run(PLAIN).per_step_s for _ in range(2))
        tried[shape] = per_step
        factor = min(16.0, max(1 / 16, target_s / per_step))
        if abs(math.log(factor)) < math.log(1.15):
            break
        shape = rescale(shape, factor)
        if shape in tried:
            break
    best = min(tried, key=lambda s: abs(math.log(tried[s] / target_s)))
    return best, tried[best]


def rescale(shape: Shape, factor: float) -> Shape:
    """Step time ~ width^2 * batch: scale the width (32 to MAX_WIDTH); the batch grows
    only beyond MAX_WIDTH, and never shrinks."""
    width = min(MAX_WIDTH, max(32, round(shape.width * math.sqrt(factor) / 32) * 32))
    batch = shape.batch
    if width == MAX_WIDTH:
        batch = max(batch, round(batch * factor * (shape.width / width) ** 2))
    return Shape(width, batch)


# ------------------------------------------------------------------------------ report


def per_step(r: RunTimes) -> float:
    return r.per_step_s


@dataclass
class ScaleResult:
    scale: Scale
    shape: Shape
    runs: dict[str, list[RunTimes]]  # by row, in repetition order
    syncs: dict[str, tuple[float, Counter[str]]] = field(default_factory=dict)

    def median(self, row: str, what: Callable[[RunTimes], float] = per_step) -> float:
        return statistics.median(what(r) for r in self.runs[row])

    def ratios(self, row: str) -> list[float]:
        """Row / plain loop of the same repetition, one per repetition."""
        pairs = zip(self.runs[row], self.runs[PLAIN], strict=True)
        return [r.per_step_s / p.per_step_s for r, p in pairs]

    def ratio(self, row: str) -> float:
        """Median over repetitions of (row / plain loop of the same repetition): pairs run
        close in time, so a slow drift in the machine's load cancels."""
        return statistics.median(self.ratios(row))

    def json_rows(self) -> list[dict[str, object]]:
        """The rows for ``--json``, named "<scale>: <loop>"; seconds, like RunTimes."""
        rows = []
        for row, runs in self.runs.items():
            syncs = self.syncs.get(row)
            rows.append(result_row(
                f"{self.scale.name}: {row}", [r.per_step_s for r in runs],
                None if row == PLAIN else self.ratios(row),
                scale=self.scale.name, loop=row, width=self.shape.width, batch=self.shape.batch,
                median_chunk_s=self.median(row, lambda r: r.median_chunk_s),
                startup_s=self.median(row, lambda r: r.startup_s),
                finish_s=self.median(row, lambda r: r.finish_s),
                cuda_syncs_per_step=None if syncs is None else syncs[0]))
        return rows


def measure_scale(scale: Scale, start: Shape, device: torch.device, repeats: int, parent: str,
                  deadline: float) -> ScaleResult:
    """``deadline`` (perf_counter): no repetition starts after it once 3 are done."""
    shape, calibrated = calibrate(scale.target_s, start, device, parent)
    print(f"\n## {scale.name} per step: MLP {DEPTH} x {shape.width} wide, batch {shape.batch}, "
          f"AdamW + LambdaLR, {device.type} (calibrated: {calibrated * 1e3:.2f} ms per plain "
          f"step); {scale.warmup} warm-up + {scale.steps} timed steps per run, in chunks of "
          f"{scale.chunk}", flush=True)
    bench = Bench(scale, shape, make_data(shape), device, parent)
    rows = scale.rows
    runs: dict[str, list[RunTimes]] = {row: [] for row in rows}
    bench.time_run(PLAIN)  # warm-up run: allocator, thread pools, page cache
    for rep in range(repeats):
        if rep >= min(3, repeats) and time.perf_counter() > deadline:
            print(f"  stopped after {rep} repetitions: over the time budget (--max-minutes); "
                  "the machine is slower or busier than the sizes assume", flush=True)
            break
        for row in rows[rep % len(rows):] + rows[:rep % len(rows)]:
            runs[row].append(bench.time_run(row))
        done = ", ".join(f"{runs[row][-1].per_step_s * 1e3:.3f}" for row in rows)
        print(f"  repetition {rep + 1}/{repeats}: ms/step {done}", flush=True)
    result = ScaleResult(scale, shape, runs)
    if device.type == "cuda":
        for row in (PLAIN, FIT):
            result.syncs[row] = bench.count_syncs(row)
    print_scale(result)
    return result


def print_scale(result: ScaleResult) -> None:
    ms = 1e3
    print("\n| loop | ms/step | min-max ms/step | ratio vs plain | ms/step, median chunks | "
          "start-up ms | finish ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row, runs in result.runs.items():
        times = [r.per_step_s * ms for r in runs]
        ratio = "—" if row == PLAIN else f"{result.ratio(row):.4f}x"
        print(f"| {row} | {statistics.median(times):.4f} | {min(times):.4f}-{max(times):.4f} | "
              f"{ratio} | {result.median(row, lambda r: r.median_chunk_s) * ms:.4f} | "
              f"{result.median(row, lambda r: r.startup_s) * ms:.1f} | "
              f"{result.median(row, lambda r: r.finish_s) * ms:.1f} |")
    scale = result.scale
    plain = result.median(PLAIN)
    added = (result.ratio(FIT) - 1) * plain
    per_save = (result.ratio(scale.every_row) - result.ratio(FIT)) * plain * scale.every_steps
    print(f"\nfit adds {added * 1e6:+.1f} us per step ((ratio - 1) x plain step); saving every "
          f"{scale.every_steps} steps costs {per_save * ms:+.1f} ms per save (the difference of "
          "the two fit rows x every_steps). start-up: from the call (trainer built, run opened) "
          "to the first step; finish: from the last step to the return (fit: final checkpoint, "
          "wait, close), less one step.")
    for row, (per, where) in result.syncs.items():
        sources = ", ".join(f"{place} x{n}" for place, n in where.most_common(5)) or "none"
        print(f"CUDA syncs per step, {row}: {per:.2f} (from {sources})")


@dataclass
class Target:
    label: str
    value: float | None
    limit: float
    note: str = ""

    def verdict(self) -> str:
        if self.note:
            return self.note
        if self.value is None:
            return "n/a (not measured)"
        return "PASS" if self.value <= self.limit else "FAIL"


def print_targets(results: Sequence[ScaleResult], device: torch.device, busy: bool) -> None:
    print("\n## targets\n")
    print("| step time | target | value | result |")
    print("|---|---|---:|---|")
    for result in results:
        name = f"{result.scale.name} ({result.median(PLAIN) * 1e3:.2f} ms)"
        targets = [Target(f"fit / plain per step <= {result.scale.max_ratio:.2f}",
                          result.ratio(FIT), result.scale.max_ratio)]
        label = "CUDA syncs per step added by fit <= 0"
        if device.type == "cuda":
            added = result.syncs[FIT][0] - result.syncs[PLAIN][0]
            targets.append(Target(label, added, 0.0))
        else:
            targets.append(Target(label, None, 0.0,
                                  note=f"n/a: needs a CUDA device (ran on {device.type})"))
        for target in targets:
            value = "" if target.value is None else f"{target.value:.4f}"
            verdict = target.verdict()
            if busy and verdict in ("PASS", "FAIL"):
                verdict += " (CPUs busy with other processes: noisy)"
            print(f"| {name} | {target.label} | {value} | {verdict} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: short blocks, 2 repetitions (under 30 s on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of each loop per step time (default: 7, --quick 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's, one per core); 1 is far "
                        "less sensitive to other processes on a small shared machine")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget: after 3 repetitions, no more start past it "
                        "(default: 5, --quick 0.5)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--dir", default=None,
                        help="parent folder for the run_dirs (a temporary folder is made "
                        "inside it and removed at the end); default: the system temp folder")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = max(1, args.repeats if args.repeats is not None else (2 if args.quick else 7))
    scales = QUICK if args.quick else FULL
    if args.max_minutes is None:
        args.max_minutes = 0.5 if args.quick else 5.0

    parent = tempfile.mkdtemp(prefix="hardtrain-step-bench-", dir=args.dir)
    print(f"# Step overhead benchmark{' (--quick)' if args.quick else ''}\n\n"
          f"torch {torch.__version__}, device {device}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {load_average()}; run_dirs "
          f"in {parent}; {repeats} interleaved runs per loop after 1 warm-up run.", flush=True)
    busy = machine_busy()
    if busy:
        print("WARNING: other processes are using the CPUs: timings will be noisy (with "
              "--threads 1 a busy core slows a step less).", flush=True)
    started = time.perf_counter()
    results = []
    start = Shape(width=256, batch=64 if device.type == "cpu" else 1024)
    # Each scale's share of the budget: in proportion to the step time of a run.
    weights = [s.target_s * (s.warmup + s.steps) for s in scales]
    budget_s = args.max_minutes * 60
    try:
        for i, scale in enumerate(scales):
            deadline = started + budget_s * sum(weights[: i + 1]) / sum(weights)
            result = measure_scale(scale, start, device, repeats, parent, deadline)
            results.append(result)
            start = result.shape  # the next scale's calibration starts from here
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    print_targets(results, device, busy)
    print(f"\nA run's ms/step is the fastest chunk of its timed block (chunk wall time / its "
          f"steps; \"median chunks\": its median chunk, which shows how noisy the machine was); "
          f"ms/step columns are medians over repetitions, ratio = median over repetitions of "
          f"(row / plain loop of the same repetition). Targets are reported, never enforced. "
          f"Load average at the end {load_average()}; total "
          f"{time.perf_counter() - started:.0f} s.")
    if args.json:
        write_json(args.json, "step_overhead", [r for res in results for r in res.json_rows()],
                   device=str(device), torch_threads=torch.get_num_threads(), quick=args.quick,
                   busy=busy, load_average_end=load_average())
    return 0


def machine_busy() -> bool:
    """1-minute load over a quarter of the CPUs; asked before this benchmark loads them."""
    return os.getloadavg()[0] > 0.25 * (os.cpu_count() or 1)


def load_average() -> str:
    """Other processes' load spoils timings on a small machine: shown with the results."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
