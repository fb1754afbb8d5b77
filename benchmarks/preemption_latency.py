"""Preemption latency benchmark: time from SIGTERM to checkpoint committed and to exit.

Each trial starts a fresh training process (this file with ``--worker``): a model whose
parameters plus AdamW moments total about the given state size, trained by
``HardenedTrainer.fit`` with ``CheckpointPolicy(every=--gap, async_save=True)`` and the
default ``PreemptionPolicy`` (deadline 25 s), run_dir on local disk. Its step is cheap (a
tiny head on a 16-wide batch plus ``--step-ms`` of sleep, like a GPU step the host waits
on): the large tensors get no gradient, so AdamW leaves them alone, but their moments
exist and are saved. The parent sends SIGTERM once the worker is in the chosen state:

* idle: no save in flight. After the first checkpoint is committed, a random delay inside
  the gap before the next save (saves come ``--gap`` seconds after the previous one ends);
* save in flight: after the second ``save_async`` returned (its staging buffer already
  allocated by the first), at a random moment within 0.8x the first save's write time.

Per trial: t_signal (the parent's ``time.time()`` just before ``os.kill``), the events'
``time`` from events.jsonl (``preemption_requested``, the ``checkpoint_saved`` of the step
it stopped at, ``preempted``), when ``fit`` raised and when the process was gone (the
parent's ``wait()``). Whether a save really was in flight at the signal is read from the
worker's save start/end times, not assumed. Tables: p50 / p95 / max per configuration
(p95 interpolated between order statistics: over 20 trials, between the two slowest), the
phases (medians) that make up signal -> exit, then the targets (reported, never enforced):
at 1 GiB, p95 <= 5 s; every trial exits inside the deadline, or an event says why not.

    python benchmarks/preemption_latency.py                           # 20 trials x 4, ~22 min
    python benchmarks/preemption_latency.py --trials 3 --sizes 64MiB  # smoke, ~1 min
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from _units import GIB, MIB, format_bytes, parse_size

SCENARIOS = ("idle", "in-flight")
TERM = 128 + signal.SIGTERM
TAG = "@@bench"  # the worker's protocol lines on stdout start with this
TARGET_S = 5.0
TARGET_BYTES = GIB

# --------------------------------------------------------------------------- helpers






def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def dd_seconds(folder: str, num_bytes: int) -> float | None:
    """A durable write of ``num_bytes`` to a new file (dd conv=fdatasync), the disk's pace
    for reference; None where dd is missing or fails."""
    path = os.path.join(folder, "dd.bin")
    count = max(1, num_bytes // (4 * MIB))
    cmd = ["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "conv=fdatasync"]
    try:
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        return time.perf_counter() - start
    except (OSError, subprocess.CalledProcessError):
        return None
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def print_dd(folder: str, sizes: Sequence[int], when: str) -> None:
    for size in sizes:
        s = dd_seconds(folder, size)
        if s is not None:
            print(f"dd conv=fdatasync of {format_bytes(size)} ({when}): {s:.2f} s = "
                  f"{size / s / 1e9:.2f} GB/s", flush=True)


# ---------------------------------------------------------------------------- worker


def emit(*fields: object) -> None:
    print(TAG, *fields, flush=True)


def worker(args: argparse.Namespace) -> None:
    """One training process, stopped by the parent's SIGTERM. Protocol lines on stdout:
    EVENT <json> (every hardtrain event, as recorded), SAVE <step> <start> <end> (a
    save_async call), RAISED <time> <code> (fit raised), ATEXIT <time>."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import hardtrain as ht
    from hardtrain import telemetry

    torch.set_num_threads(args.threads)
    record = telemetry.EventLog.record

    def echo(self: Any, event: str, **kw: Any) -> None:
        record(self, event, **kw)
        entry = {"time": time.time(), "event": event, **kw}
        emit("EVENT", json.dumps(entry, default=str))

    telemetry.EventLog.record = echo  # type: ignore[method-assign]
    save_async = ht.CheckpointStore.save_async

    def timed_save_async(self: Any, step: int, *a: Any, **kw: Any) -> None:
        start = time.time()
        save_async(self, step, *a, **kw)
        emit("SAVE", step, start, time.time())

    ht.CheckpointStore.save_async = timed_save_async  # type: ignore[method-assign]

    # Parameters, exp_avg and exp_avg_sq: three float32 tensors of each shape.
    cols = 1024
    rows = max(1, args.state_bytes // (3 * 4 * cols))
    per_tensor = 64 * MIB // (4 * cols)  # rows: 64 MiB per tensor at most
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.body = torch.nn.ParameterList(
        torch.nn.Parameter(torch.empty(min(per_tensor, rows - i), cols).uniform_(-0.02, 0.02))
        for i in range(0, rows, per_tensor)
    )
    head = model.head = torch.nn.Linear(16, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # The moments AdamW would have after some training (a real step over all of them takes
    # seconds here); the body gets no gradient below, so AdamW leaves them as they are.
    for p in model.body:
        optimizer.state[p] = {
            "step": torch.tensor(100.0),
            "exp_avg": torch.empty_like(p).uniform_(-1e-4, 1e-4),
            "exp_avg_sq": torch.empty_like(p).uniform_(0, 1e-8),
        }
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(512, 16, generator=g),
                                    torch.randn(512, 1, generator=g)),
                      batch_size=16, shuffle=True)
    trainer = ht.HardenedTrainer(
        model, optimizer, data, args.run_dir, seed=0,
        checkpoint=ht.CheckpointPolicy(every=args.gap, keep_last=2),
        preemption=ht.PreemptionPolicy(deadline=args.deadline),
    )
    step_s = args.step_ms / 1000

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(head(x), y)
        time.sleep(step_s)
        return loss

    atexit.register(lambda: emit("ATEXIT", time.time()))
    try:
        trainer.fit(step_fn, max_steps=10**9)
    except SystemExit as e:
        emit("RAISED", time.time(), e.code)
        raise


# ---------------------------------------------------------------------------- parent


@dataclass
class Trial:
    size: int
    scenario: str
    problem: str | None = None  # why it has no numbers (never reached the state, hung)
    exit_code: int | None = None
    deadline_s: float = 0.0
    state_bytes: int | None = None  # the checkpoints' size on disk
    # The saves during training (before the signal), from their checkpoint_saved events:
    first_blocking_s: float | None = None  # the first save_async: allocates the staging
    later_blocking_s: list[float] = field(default_factory=list)
    background_persist_s: list[float] = field(default_factory=list)  # write + commit
    in_flight: bool = False  # a save_async had started and not ended at the signal
    in_flight_outcome: str | None = None  # committed / abandoned / failed
    saved: bool = False
    reason: str | None = None  # an event that says why it was not saved / was late
    # Seconds after the signal:
    requested: float | None = None  # preemption_requested
    in_flight_done: float | None = None  # the in-flight save committed or given up
    committed: float | None = None  # checkpoint_saved of the stop step
    preempted: float | None = None  # the preempted event
    raised: float | None = None  # fit raised Preempted (its finally blocks done)
    atexit_s: float | None = None  # this worker's atexit handler ran
    exit: float | None = None  # the parent's wait() returned

    @property
    def outside_deadline(self) -> bool:
        return self.problem is not None or self.exit is None or self.exit > self.deadline_s


@dataclass
class Lines:
    """The worker's stdout, read by a thread (a pipe must never fill up)."""

    proc: subprocess.Popen[str]
    items: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    saves: list[tuple[int, float, float]] = field(default_factory=list)
    raised: float | None = None
    atexit_s: float | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith(TAG):
                continue
            kind, _, rest = line[len(TAG):].strip().partition(" ")
            if kind == "SAVE":
                step, start, end = rest.split()
                self.saves.append((int(step), float(start), float(end)))
            elif kind == "RAISED":
                self.raised = float(rest.split()[0])
            elif kind == "ATEXIT":
                self.atexit_s = float(rest)
            self.items.put((kind, rest))

    def next(self, until: float) -> tuple[str, str] | None:
        try:
            return self.items.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            return None


def run_trial(size: int, scenario: str, parent: str, args: argparse.Namespace,
              rng: random.Random) -> Trial:
    trial = Trial(size, scenario, deadline_s=args.deadline)
    run_dir = tempfile.mkdtemp(prefix=f"{scenario}-", dir=parent)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--run-dir", run_dir,
           "--state-bytes", str(size), "--gap", str(args.gap), "--step-ms", str(args.step_ms),
           "--deadline", str(args.deadline), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    stderr_path = os.path.join(parent, "worker-stderr.txt")
    try:
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    env=env)
            lines = Lines(proc)
            try:
                t_signal = signal_when_ready(proc, lines, scenario, trial, args, rng)
            finally:
                if trial.problem is not None:
                    proc.kill()
            try:
                proc.wait(timeout=args.deadline + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                trial.problem = f"still running {args.deadline + 60:.0f} s after SIGTERM: killed"
            t_exit = time.time()
        lines.thread.join(timeout=10)
        trial.exit_code = proc.returncode
        if t_signal is not None and trial.problem is None:
            trial.exit = t_exit - t_signal
            read_events(trial, run_dir, t_signal, lines)
        if trial.exit_code != TERM or trial.problem is not None:
            with open(stderr_path) as f:
                tail = f.read()[-2000:]
            print(f"    exit {trial.exit_code} ({trial.problem}); worker stderr ends:\n{tail}",
                  file=sys.stderr)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return trial


def signal_when_ready(proc: subprocess.Popen[str], lines: Lines, scenario: str, trial: Trial,
                      args: argparse.Namespace, rng: random.Random) -> float | None:
    """Wait for the state the scenario wants, send SIGTERM; the signal's time, or None
    (``trial.problem`` says why)."""
    until = time.monotonic() + args.ready_timeout
    first_commit: dict[str, Any] | None = None
    while True:
        got = lines.next(until)
        if got is None:
            trial.problem = (f"not ready after {args.ready_timeout:.0f} s" if proc.poll() is None
                             else f"worker exited early ({proc.returncode})")
            return None
        kind, rest = got
        if kind == "EVENT":
            entry = json.loads(rest)
            if entry["event"] == "checkpoint_saved" and first_commit is None:
                first_commit = entry
                if scenario == "idle":
                    # The next save starts --gap seconds after this one was collected.
                    time.sleep(rng.uniform(0.1, max(0.2, args.gap - 0.5)))
                    break
        elif kind == "SAVE" and first_commit is not None and scenario == "in-flight":
            step = int(rest.split()[0])
            if step > first_commit["step"]:
                time.sleep(rng.uniform(0.0, 0.8 * float(first_commit["persist_s"])))
                break
    t_signal = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    return t_signal


def read_events(trial: Trial, run_dir: str, t_signal: float, lines: Lines) -> None:
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        events: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]

    def after(entry: dict[str, Any] | None) -> float | None:
        return None if entry is None else entry["time"] - t_signal

    def find(name: str, step: int | None = None) -> dict[str, Any] | None:
        for e in events:
            if e["event"] == name and (step is None or e.get("step") == step):
                return e
        return None

    saved_events = [e for e in events if e["event"] == "checkpoint_saved"]
    if saved_events:
        trial.state_bytes = saved_events[0]["bytes"]
    async_steps = {step for step, _, _ in lines.saves}
    started = [e for e in saved_events if e["step"] in async_steps]  # all before the signal
    if started:
        trial.first_blocking_s = started[0]["blocking_s"]
        trial.later_blocking_s = [e["blocking_s"] for e in started[1:]]
        trial.background_persist_s = [e["persist_s"] for e in started if e["time"] < t_signal]
    trial.requested = after(find("preemption_requested"))
    preempted = find("preempted")
    trial.preempted = after(preempted)
    for step, start, _end in lines.saves:
        if start >= t_signal:
            continue
        done = find("checkpoint_saved", step)
        failed = find("checkpoint_save_failed", step)
        abandoned = find("checkpoint_save_abandoned", step)
        ends = [e["time"] for e in (done, failed, abandoned) if e is not None]
        end = min(ends, default=math.inf)
        if end > t_signal:
            trial.in_flight = True
            trial.in_flight_done = None if end == math.inf else end - t_signal
            trial.in_flight_outcome = ("committed" if done is not None else
                                       "abandoned" if abandoned is not None
                                       else "failed" if failed else "never ended")
    if preempted is not None:
        trial.saved = bool(preempted["saved"])
        if trial.saved:
            trial.committed = after(find("checkpoint_saved", preempted["step"]))
    reasons = [f"{e['event']}: {e.get('reason') or e.get('error')}" for e in events
               if e["event"] in ("preemption_save_skipped", "checkpoint_save_failed")]
    trial.reason = "; ".join(reasons) or None
    trial.raised = None if lines.raised is None else lines.raised - t_signal
    trial.atexit_s = None if lines.atexit_s is None else lines.atexit_s - t_signal


# --------------------------------------------------------------------------- reports


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return (f"{percentile(values, 50):.2f} / {percentile(values, 95):.2f} / "
            f"{max(values):.2f}")


def print_tables(results: dict[tuple[int, str], list[Trial]]) -> None:
    print("\n## signal -> committed and signal -> exit (seconds: p50 / p95 / max)\n")
    print("| state | scenario | trials | save in flight at signal | stop step saved | "
          "signal -> committed | signal -> exit | outside deadline | exit codes |")
    print("|---|---|---:|---|---:|---|---|---:|---|")
    for (size, scenario), trials in results.items():
        ok = [t for t in trials if t.problem is None]
        flight = Counter(t.in_flight_outcome for t in ok if t.in_flight)
        flight_text = f"{sum(flight.values())}/{len(ok)}"
        if flight:
            flight_text += " (" + ", ".join(f"{n} {k}" for k, n in sorted(flight.items())) + ")"
        codes = Counter(t.exit_code for t in trials)
        state = format_bytes(next((t.state_bytes for t in ok if t.state_bytes), size))
        print(f"| {state} | {scenario} | {len(trials)} | {flight_text} | "
              f"{sum(t.saved for t in ok)}/{len(ok)} | "
              f"{fmt([t.committed for t in ok if t.committed is not None])} | "
              f"{fmt([t.exit for t in ok if t.exit is not None])} | "
              f"{sum(t.outside_deadline for t in trials)} | "
              f"{', '.join(f'{c} x{n}' for c, n in sorted(codes.items(), key=str))} |")

    print("\n## where signal -> exit goes (medians, seconds)\n")
    print("| state | scenario | rest of step + vote | save in flight (finish or abandon) "
          "| stop save (sync) | -> preempted event | fit's close (-> raise) | -> atexit "
          "| interpreter finalization | signal -> exit |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for (size, scenario), trials in results.items():
        ok = [t for t in trials if t.problem is None and t.exit is not None]
        if not ok:
            continue
        phases: list[list[float]] = [[] for _ in range(7)]
        for t in ok:
            marks = [t.requested, t.in_flight_done if t.in_flight else None, t.committed,
                     t.preempted, t.raised, t.atexit_s, t.exit]
            last = 0.0
            for i, mark in enumerate(marks):
                if mark is not None and mark >= last:
                    phases[i].append(mark - last)
                    last = mark
                else:
                    phases[i].append(0.0)
        cells = [f"{percentile(p, 50):.3f}" for p in phases]
        rates = [t.state_bytes / (t.committed - max(t.requested or 0, t.in_flight_done or 0))
                 for t in ok if t.state_bytes and t.committed]
        if rates:  # the stop save's pace, from the preemption request (or the end of the
            # save in flight) to its checkpoint_saved
            cells[2] += f" ({percentile(rates, 50) / 1e9:.2f} GB/s)"
        medians = " | ".join(cells)
        state = format_bytes(next((t.state_bytes for t in ok if t.state_bytes), size))
        exits = [t.exit for t in ok if t.exit is not None]
        print(f"| {state} | {scenario} | {medians} | {percentile(exits, 50):.3f} |")

    print("\n## the saves during training, before the signal (medians over trials)\n")
    print("| state | first save_async blocking (allocates staging) | later save_async blocking "
          "| background write + commit | its pace |")
    print("|---|---:|---:|---:|---:|")
    by_size: dict[int, list[Trial]] = {}
    for (size, _), trials in results.items():
        by_size.setdefault(size, []).extend(t for t in trials if t.problem is None)
    for size, trials in by_size.items():
        first = [t.first_blocking_s for t in trials if t.first_blocking_s is not None]
        later = [x for t in trials for x in t.later_blocking_s]
        persist = [x for t in trials for x in t.background_persist_s]
        num_bytes = next((t.state_bytes for t in trials if t.state_bytes), size)
        cells = [f"{percentile(v, 50):.3f} s" if v else "n/a" for v in (first, later, persist)]
        pace = f"{num_bytes / percentile(persist, 50) / 1e9:.2f} GB/s" if persist else "n/a"
        print(f"| {format_bytes(num_bytes)} | {' | '.join(cells)} | {pace} |")

    reasons = Counter(t.reason or t.problem for trials in results.values() for t in trials
                      if t.reason or t.problem)
    if reasons:
        print("\nEvents that say why a save was skipped, failed or abandoned (and problems):")
        for text, n in reasons.most_common():
            print(f"- {n} x {text}")


def print_targets(results: dict[tuple[int, str], list[Trial]]) -> None:
    print("\n## targets\n")
    print("| state | scenario | target | value | result |")
    print("|---|---|---|---:|---|")
    for (size, scenario), trials in results.items():
        ok = [t for t in trials if t.problem is None]
        state = format_bytes(size)
        if size == TARGET_BYTES:
            for label, values in (
                ("signal -> committed p95 <= 5 s",
                 [t.committed for t in ok if t.committed is not None]),
                ("signal -> exit p95 <= 5 s", [t.exit for t in ok if t.exit is not None]),
            ):
                if values:
                    p95 = percentile(values, 95)
                    verdict = "PASS" if p95 <= TARGET_S and len(values) == len(trials) else (
                        "FAIL" if p95 > TARGET_S else "FAIL (not every trial saved)")
                    print(f"| {state} | {scenario} | {label} | {p95:.2f} | {verdict} |")
                else:
                    print(f"| {state} | {scenario} | {label} | | n/a |")
        unexplained = [t for t in trials if (t.outside_deadline or not t.saved) and not t.reason]
        print(f"| {state} | {scenario} | inside the deadline and saved, or an event says why "
              f"not | {len(unexplained)} unexplained of {len(trials)} | "
              f"{'PASS' if not unexplained else 'FAIL'} |")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="per configuration (default 20)")
    parser.add_argument("--sizes", default="64MiB,1GiB",
                        help="comma-separated state sizes (default: %(default)s)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, of: %(default)s")
    parser.add_argument("--gap", type=float, default=2.0,
                        help="seconds between the end of a save and the next (default 2)")
    parser.add_argument("--step-ms", type=float, default=5.0,
                        help="sleep in each step, ms (default 5)")
    parser.add_argument("--deadline", type=float, default=25.0,
                        help="PreemptionPolicy deadline, s (default 25, the default policy)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / OpenMP threads in the workers (default 1)")
    parser.add_argument("--ready-timeout", type=float, default=180.0,
                        help="give a trial up if its worker is not ready by then, s")
    parser.add_argument("--seed", type=int, default=0, help="for the signal delays")
    parser.add_argument("--dir", default=None,
                        help="parent folder for the run_dirs (a temporary folder is made inside "
                        "it and removed at the end); default: the current directory")
    parser.add_argument("--json", default=None, help="also write every trial to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--state-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"--scenarios: {s!r} is not one of {', '.join(SCENARIOS)}")
    configs = [(size, s) for size in sizes for s in scenarios]
    parent = tempfile.mkdtemp(prefix="hardtrain-preempt-bench-", dir=args.dir or os.getcwd())
    print(f"# Preemption latency benchmark\n\n{os.cpu_count()} CPUs, load average "
          f"{load_average()}; run_dirs in {parent}; {args.trials} trials per configuration, "
          f"interleaved; a fresh process per trial; step {args.step_ms:g} ms (sleep) + a "
          f"tiny head; saves {args.gap:g} s apart; deadline {args.deadline:g} s; "
          f"{args.threads} thread(s) per worker.", flush=True)
    print_dd(parent, sizes, "before")
    rng = random.Random(args.seed)
    results: dict[tuple[int, str], list[Trial]] = {c: [] for c in configs}
    started = time.perf_counter()
    try:
        for i in range(args.trials):
            order = configs[i % len(configs):] + configs[:i % len(configs)]
            for size, scenario in order:
                trial = run_trial(size, scenario, parent, args, rng)
                results[(size, scenario)].append(trial)
                committed = "not saved" if trial.committed is None else f"{trial.committed:.2f}"
                exit_s = "n/a" if trial.exit is None else f"{trial.exit:.2f}"
                flight = (f", save in flight ({trial.in_flight_outcome})"
                          if trial.in_flight else "")
                print(f"  trial {i + 1}/{args.trials} {format_bytes(size)} {scenario}: "
                      f"committed {committed} s, exit {exit_s} s, code {trial.exit_code}"
                      f"{flight}{', ' + trial.problem if trial.problem else ''}", flush=True)
        print_dd(parent, sizes, "after")
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    # Tables in configuration order.
    results = {c: results[c] for c in configs if results[c]}
    print_tables(results)
    print_targets(results)
    print(f"\nSeconds are after the parent's time.time() just before os.kill(SIGTERM), to the "
          f"events' time (events.jsonl) and to the parent's wait() returning. p95 interpolates "
          f"between order statistics. Targets are reported, never enforced. Load average at "
          f"the end {load_average()}; total {time.perf_counter() - started:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([t.__dict__ for trials in results.values() for t in trials], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
