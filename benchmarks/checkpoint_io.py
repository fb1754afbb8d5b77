"""Checkpoint I/O benchmark: hardtrain's CheckpointStore against the usual alternatives.

For each size, builds a float32 state shaped like a transformer's state dict and measures,
as medians over ``--repeats`` runs (one warm-up run first, discarded):

* hardtrain ``save`` (durable), ``save_async`` (blocking time, and time until committed),
  ``load(out=...)`` into the existing warm tensors and ``load()`` into fresh ones;
* baselines in the same run: ``torch.save`` + fsync, ``torch.load(weights_only=True)``,
  ``torch.distributed.checkpoint`` save / async_save / load, a ``dd ... conv=fdatasync``
  write of the same size, and a plain copy of the state into warm preallocated buffers;
* the peak extra memory (RSS) of ``save_async`` relative to the state size.

Then prints one table per size and a "targets" section (ratios, pass/fail; never fails).

    python benchmarks/checkpoint_io.py --sizes 64MiB --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from _units import KIB, MIB, format_bytes, parse_size
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from hardtrain import CheckpointStore

T = TypeVar("T")
State = dict[str, torch.Tensor]


VOCAB = 32_000
CONTEXT = 1024
DD_BLOCK = 4 * MIB

# Row names (also how targets find their numbers).
MEMCPY = "memory copy into warm buffers"
DD = "dd conv=fdatasync"
TORCH_SAVE = "torch.save + fsync"
TORCH_LOAD = "torch.load(weights_only=True)"
DCP_SAVE = "DCP save"
DCP_ASYNC_BLOCK = "DCP async_save: blocking"
DCP_ASYNC_DONE = "DCP async_save: until done"
DCP_LOAD = "DCP load (in place)"
HT_SAVE = "hardtrain save (durable)"
HT_ASYNC_BLOCK = "hardtrain save_async: blocking"
HT_ASYNC_DONE = "hardtrain save_async: until committed"
HT_LOAD_OUT = "hardtrain load(out=) warm tensors"
HT_LOAD_NEW = "hardtrain load() fresh tensors"


# --------------------------------------------------------------------------- helpers






def median_time(
    fn: Callable[[], T], repeats: int, *, after: Callable[[T], object] | None = None
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one discarded warm-up call.

    ``after(result)`` runs untimed after each call (clean-up); the result is released only
    after the clock stopped, so freeing it is not timed either.
    """
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        if after is not None:
            after(result)
        del result
        if i > 0:
            times.append(elapsed)
    return statistics.median(times)


def median_phases(fn: Callable[[], Mapping[str, float]], repeats: int) -> dict[str, float]:
    """Like ``median_time`` for a ``fn`` that times its own phases: median of each phase."""
    runs = [fn() for _ in range(repeats + 1)][1:]
    return {phase: statistics.median(run[phase] for run in runs) for phase in runs[0]}


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest mount point that contains it)."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            mount_point = fields[1].replace("\\040", " ")
            inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) > len(best):
                best, fstype = mount_point, fields[2]
    return fstype


def dcp_kwargs() -> dict[str, Any]:
    """Single-process DCP without a process group."""
    return {"no_dist": not (dist.is_available() and dist.is_initialized())}


# ------------------------------------------------------------------------------ state


def transformer_shape(target_bytes: int) -> tuple[int, int, int]:
    """(width, layers, vocab) of a GPT-like float32 model of about ``target_bytes``.

    Width is a multiple of 64 with width / layers close to 64 (GPT-2-like proportions); the
    vocabulary is capped so that the embedding stays under a third of the model.
    """
    params = max(target_bytes // 4, 1)
    best: tuple[float, int, int, int] | None = None
    for width in range(64, 32_768 + 1, 64):
        vocab = max(64, min(VOCAB, params // (3 * width)))
        fixed = (vocab + CONTEXT + 2) * width
        per_layer = 12 * width * width + 13 * width
        layers = max(1, round((params - fixed) / per_layer))
        total = fixed + layers * per_layer
        score = abs(math.log(width / (64 * layers))) + 4 * abs(math.log(total / params))
        if best is None or score < best[0]:
            best = (score, width, layers, vocab)
        if fixed > params:
            break
    assert best is not None
    return best[1], best[2], best[3]


def build_state(target_bytes: int) -> State:
    """A transformer-shaped state dict: embeddings, then per layer LayerNorms, attention
    qkv/proj and MLP weights and biases, then the final LayerNorm (lm_head tied)."""
    width, layers, vocab = transformer_shape(target_bytes)
    shapes: dict[str, tuple[int, ...]] = {
        "embed.tokens.weight": (vocab, width),
        "embed.positions.weight": (CONTEXT, width),
    }
    for i in range(layers):
        p = f"layers.{i}"
        shapes |= {
            f"{p}.ln1.weight": (width,), f"{p}.ln1.bias": (width,),
            f"{p}.attn.qkv.weight": (3 * width, width), f"{p}.attn.qkv.bias": (3 * width,),
            f"{p}.attn.proj.weight": (width, width), f"{p}.attn.proj.bias": (width,),
            f"{p}.ln2.weight": (width,), f"{p}.ln2.bias": (width,),
            f"{p}.mlp.fc.weight": (4 * width, width), f"{p}.mlp.fc.bias": (4 * width,),
            f"{p}.mlp.proj.weight": (width, 4 * width), f"{p}.mlp.proj.bias": (width,),
        }
    shapes |= {"final_ln.weight": (width,), "final_ln.bias": (width,)}
    state = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.float32)
        state[name] = tensor.normal_(0.0, 0.02) if len(shape) > 1 else tensor.uniform_(-1, 1)
    return state


# ------------------------------------------------------------------------ measurements


@dataclass
class Row:
    operation: str
    seconds: float | None
    num_bytes: int
    reference: str | None = None  # the row this one is compared with
    problem: str | None = None  # why it was not measured

    @property
    def gb_per_s(self) -> float | None:
        return self.num_bytes / self.seconds / 1e9 if self.seconds else None


def measure_memcpy(state: State, repeats: int) -> float:
    buffers = {name: torch.empty_like(t) for name, t in state.items()}
    for name, t in state.items():  # touch every page before timing
        buffers[name].copy_(t)

    def copy_all() -> None:
        for name, t in state.items():
            buffers[name].copy_(t)

    return median_time(copy_all, repeats)


def measure_dd(folder: str, num_bytes: int, repeats: int) -> tuple[float, int]:
    """Median seconds of a durable dd write of about ``num_bytes``, and the bytes written."""
    count = max(1, math.ceil(num_bytes / DD_BLOCK))
    path = os.path.join(folder, "dd.bin")
    cmd = ["dd", "if=/dev/zero", f"of={path}", f"bs={DD_BLOCK}", f"count={count}"]
    cmd.append("conv=fdatasync")

    def one() -> dict[str, float]:
        start = time.perf_counter()
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}
        )
        wall = time.perf_counter() - start
        os.remove(path)
        reported = re.search(r"copied, ([0-9.]+) s", done.stderr)
        return {"s": float(reported.group(1)) if reported else wall}

    return median_phases(one, repeats)["s"], count * DD_BLOCK


def torch_save_durable(state: State, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def measure_torch(state: State, folder: str, repeats: int) -> dict[str, float]:
    path = os.path.join(folder, "state.pt")
    save_s = median_time(
        lambda: torch_save_durable(state, path), repeats, after=lambda _: os.remove(path)
    )
    torch_save_durable(state, path)
    load_s = median_time(lambda: torch.load(path, weights_only=True), repeats)
    os.remove(path)
    return {TORCH_SAVE: save_s, TORCH_LOAD: load_s}


def measure_dcp_save(state: State, folder: str, repeats: int) -> float:
    names = (os.path.join(folder, f"dcp-save-{i}") for i in itertools.count())

    def save() -> str:
        target = next(names)
        dcp_save(state, checkpoint_id=target, **dcp_kwargs())
        return target

    return median_time(save, repeats, after=shutil.rmtree)


def measure_dcp_async(state: State, folder: str, repeats: int) -> dict[str, float]:
    names = (os.path.join(folder, f"dcp-async-{i}") for i in itertools.count())

    def one() -> dict[str, float]:
        target = next(names)
        start = time.perf_counter()
        response: Any = dcp_async_save(state, checkpoint_id=target, **dcp_kwargs())
        blocking = time.perf_counter() - start
        # torch returns a Future, or (with some stagers) an AsyncSaveResponse.
        future: Future[Any] = getattr(response, "upload_completion", response)
        future.result()
        done = time.perf_counter() - start
        shutil.rmtree(target)
        return {DCP_ASYNC_BLOCK: blocking, DCP_ASYNC_DONE: done}

    return median_phases(one, repeats)


def measure_dcp_load(state: State, folder: str, repeats: int) -> float:
    target = os.path.join(folder, "dcp-load")
    dcp_save(state, checkpoint_id=target, **dcp_kwargs())
    load_s = median_time(lambda: dcp_load(state, checkpoint_id=target, **dcp_kwargs()), repeats)
    shutil.rmtree(target)
    return load_s


def measure_hardtrain_save(state: State, folder: str, repeats: int) -> float:
    steps = itertools.count()
    with CheckpointStore(folder) as store:
        return median_time(
            lambda: store.save(next(steps), state, {"note": "benchmark"}),
            repeats,
            after=lambda info: shutil.rmtree(info.path),
        )


def measure_hardtrain_async(state: State, folder: str, repeats: int) -> dict[str, float]:
    """One store for all runs, so the staging buffer is reused as in training."""
    steps = itertools.count()
    with CheckpointStore(folder) as store:

        def one() -> dict[str, float]:
            start = time.perf_counter()
            store.save_async(next(steps), state, {"note": "benchmark"})
            blocking = time.perf_counter() - start
            info = store.wait()
            committed = time.perf_counter() - start
            if info is not None:
                shutil.rmtree(info.path)
            return {HT_ASYNC_BLOCK: blocking, HT_ASYNC_DONE: committed}

        return median_phases(one, repeats)


def measure_hardtrain_load(state: State, folder: str, repeats: int) -> dict[str, float]:
    """Page cache warm: the checkpoint was just written, and each run reads it again."""
    with CheckpointStore(folder) as store:
        store.save(0, state, {"note": "benchmark"})
        fresh = store.load().tensors
        same = fresh.keys() == state.keys() and all(torch.equal(fresh[k], state[k]) for k in fresh)
        if not same:
            print(f"WARNING: {folder}: loaded tensors differ from the saved ones", file=sys.stderr)
        del fresh
        out_s = median_time(lambda: store.load(out=state), repeats)
        new_s = median_time(lambda: store.load(), repeats)
    return {HT_LOAD_OUT: out_s, HT_LOAD_NEW: new_s}


# ----------------------------------------------------------------------------- memory


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * KIB
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Polls /proc/self/status in a thread: peak RssAnon (VmHWM does not split anon/file),
    and peak VmRSS where VmHWM cannot be reset."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak_anon = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        status = proc_status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        self.peak_rss = max(self.peak_rss, status["VmRSS"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class PeakMemory:
    total: int  # peak RSS (anonymous + file-backed) above the RSS before the call
    anon: int  # peak anonymous RSS above the anonymous RSS before the call
    method: str


@contextlib.contextmanager
def peak_memory(result: list[PeakMemory]) -> Iterator[None]:
    gc.collect()
    before = proc_status()
    exact = reset_peak_rss()
    with RssSampler() as sampler:
        yield
    after = proc_status()
    peak = after["VmHWM"] if exact else max(sampler.peak_rss, after["VmRSS"])
    method = "VmHWM (reset via clear_refs)" if exact else "sampled VmRSS"
    result.append(PeakMemory(peak - before["VmRSS"], sampler.peak_anon - before["RssAnon"], method))


def measure_async_memory(state: State, folder: str) -> tuple[PeakMemory, PeakMemory]:
    """Peak extra RSS of save_async + wait: on a new store (the staging buffer is allocated:
    the total a trainer pays), and on the next save (buffer reused: the transient part)."""
    peaks: list[PeakMemory] = []
    with CheckpointStore(folder) as store:
        for step in range(2):
            with peak_memory(peaks):
                store.save_async(step, state, {"note": "benchmark"})
                info = store.wait()
            if info is not None:
                shutil.rmtree(info.path)
    return peaks[0], peaks[1]


# ------------------------------------------------------------------------------ report


def measure_rows(
    names_refs: Mapping[str, str | None], fn: Callable[[], Mapping[str, float]], num_bytes: int
) -> dict[str, Row]:
    """Run one measurement; its rows name their reference. A failure becomes n/a cells."""
    print(f"  measuring {', '.join(names_refs)} ...", flush=True)
    problem = None
    try:
        seconds: Mapping[str, float | None] = fn()
    except Exception as e:  # a broken path is a table cell, not a crash
        print(f"    failed: {type(e).__name__}: {e}", file=sys.stderr)
        problem = f"{type(e).__name__}: {e}"
        problem = problem if len(problem) <= 80 else problem[:77] + "..."
        seconds = dict.fromkeys(names_refs)
    finally:
        gc.collect()
    return {
        name: Row(name, seconds[name], num_bytes, ref, problem) for name, ref in names_refs.items()
    }


@dataclass
class SizeResult:
    num_bytes: int
    rows: dict[str, Row]
    peak: PeakMemory | None  # save_async on a new store


def run_size(target: int, parent: str, repeats: int) -> SizeResult:
    state = build_state(target)
    num_bytes = state_bytes(state)
    width, layers, _ = transformer_shape(target)
    print(
        f"\n## {format_bytes(target)} requested: {num_bytes:,} bytes ({format_bytes(num_bytes)}), "
        f"{len(state)} tensors (width {width}, {layers} layers), float32",
        flush=True,
    )
    folder = tempfile.mkdtemp(prefix="size-", dir=parent)

    def sub(name: str) -> str:
        path = os.path.join(folder, name)
        os.makedirs(path)
        return path

    dd_bytes = max(1, math.ceil(num_bytes / DD_BLOCK)) * DD_BLOCK
    # (rows with the row each is compared with, the measurement, the bytes it moves)
    plan: list[tuple[dict[str, str | None], Callable[[], Mapping[str, float]], int]] = [
        ({MEMCPY: None}, lambda: {MEMCPY: measure_memcpy(state, repeats)}, num_bytes),
        ({DD: None}, lambda: {DD: measure_dd(sub("dd"), num_bytes, repeats)[0]}, dd_bytes),
        (
            {TORCH_SAVE: DD, TORCH_LOAD: MEMCPY},
            lambda: measure_torch(state, sub("torch"), repeats),
            num_bytes,
        ),
        ({DCP_SAVE: DD}, lambda: {DCP_SAVE: measure_dcp_save(state, folder, repeats)}, num_bytes),
        (
            {DCP_ASYNC_BLOCK: MEMCPY, DCP_ASYNC_DONE: DD},
            lambda: measure_dcp_async(state, folder, repeats),
            num_bytes,
        ),
        (
            {DCP_LOAD: MEMCPY},
            lambda: {DCP_LOAD: measure_dcp_load(state, folder, repeats)},
            num_bytes,
        ),
        (
            {HT_SAVE: TORCH_SAVE},
            lambda: {HT_SAVE: measure_hardtrain_save(state, sub("ht-save"), repeats)},
            num_bytes,
        ),
        (
            {HT_ASYNC_BLOCK: MEMCPY, HT_ASYNC_DONE: DD},
            lambda: measure_hardtrain_async(state, sub("ht-async"), repeats),
            num_bytes,
        ),
        (
            {HT_LOAD_OUT: MEMCPY, HT_LOAD_NEW: TORCH_LOAD},
            lambda: measure_hardtrain_load(state, sub("ht-load"), repeats),
            num_bytes,
        ),
    ]
    rows: dict[str, Row] = {}
    first: PeakMemory | None = None
    steady: PeakMemory | None = None
    try:
        with warnings.catch_warnings():
            # DCP warns that it runs without a process group, which is the point here.
            warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
            for names_refs, fn, size in plan:
                rows |= measure_rows(names_refs, fn, size)
        print("  measuring peak memory of save_async ...", flush=True)
        try:
            first, steady = measure_async_memory(state, sub("ht-memory"))
        except Exception as e:
            print(f"    failed: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print_table(rows)
    if first is not None and steady is not None:
        print(f"\nPeak extra RSS of save_async + wait ({first.method}; state = {num_bytes:,} B):")
        cases = (("new store (staging allocated)", first), ("next save (buffer reused)", steady))
        for label, peak in cases:
            print(
                f"- {label}: {format_bytes(peak.total)} = {peak.total / num_bytes:.2f}x state "
                f"(anonymous only: {format_bytes(peak.anon)} = {peak.anon / num_bytes:.2f}x)"
            )
    return SizeResult(num_bytes, rows, first)


def print_table(rows: Mapping[str, Row]) -> None:
    print("\n| operation | median s | GB/s | ratio vs reference (per byte) |")
    print("|---|---:|---:|---|")
    for row in rows.values():
        if row.seconds is None:
            print(f"| {row.operation} | n/a ({row.problem}) | | |")
            continue
        ratio = "—"
        ref = rows.get(row.reference) if row.reference else None
        if ref is not None and ref.seconds:
            mine, theirs = row.seconds / row.num_bytes, ref.seconds / ref.num_bytes
            ratio = f"{mine / theirs:.2f}x {ref.operation}"
        elif row.reference:
            ratio = f"n/a ({row.reference} not measured)"
        print(f"| {row.operation} | {row.seconds:.4f} | {row.gb_per_s:.2f} | {ratio} |")


@dataclass
class Target:
    label: str
    value: float | None  # the measured ratio
    limit: float
    higher_is_better: bool = False
    note: str = ""

    def verdict(self) -> str:
        if self.note:
            return self.note
        if self.value is None:
            return "n/a (not measured)"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "PASS" if ok else "FAIL"


def targets_for(num_bytes: int, rows: Mapping[str, Row], peak: PeakMemory | None) -> list[Target]:
    def secs(name: str) -> float | None:
        row = rows.get(name)
        return row.seconds if row is not None else None

    def ratio(a: str, b: str) -> float | None:
        x, y = secs(a), secs(b)
        return x / y if x is not None and y else None

    def rate(name: str) -> float | None:
        row = rows.get(name)
        return row.gb_per_s if row is not None else None

    def share_of_dd(name: str) -> float | None:
        mine, dd = rate(name), rate(DD)
        return mine / dd if mine is not None and dd else None

    speedup = ratio(TORCH_SAVE, HT_ASYNC_BLOCK)
    small = "" if num_bytes >= 512 * MIB else f"n/a (size < 512 MiB; is {speedup or 0:.1f}x)"
    return [
        Target("save_async blocking / memory copy <= 1.5", ratio(HT_ASYNC_BLOCK, MEMCPY), 1.5),
        Target(
            "torch.save+fsync / save_async blocking >= 5 (sizes >= 512 MiB)",
            speedup, 5.0, higher_is_better=True, note=small,
        ),
        Target(
            "save_async until committed: GB/s / dd GB/s >= 0.5",
            share_of_dd(HT_ASYNC_DONE), 0.5, higher_is_better=True,
        ),
        Target(
            "save (durable): GB/s / dd GB/s >= 0.5",
            share_of_dd(HT_SAVE), 0.5, higher_is_better=True,
        ),
        Target("load(out=) / memory copy <= 2", ratio(HT_LOAD_OUT, MEMCPY), 2.0),
        # The staging buffer alone is 1x: allow 2% for the thread, allocator and JSON.
        Target(
            "save_async peak extra RSS / state <= 1 (+2% slack)",
            peak.total / num_bytes if peak is not None else None, 1.02,
        ),
        Target(
            "  same, anonymous memory only (not file pages mapped)",
            peak.anon / num_bytes if peak is not None else None, 1.02,
        ),
    ]


def print_targets(results: list[SizeResult]) -> None:
    print("\n## targets\n")
    print("| size | target | ratio | result |")
    print("|---|---|---:|---|")
    for result in results:
        size = format_bytes(result.num_bytes)
        for target in targets_for(result.num_bytes, result.rows, result.peak):
            value = "" if target.value is None else f"{target.value:.2f}"
            print(f"| {size} | {target.label} | {value} | {target.verdict()} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="64MiB,512MiB,2GiB", help="comma-separated sizes (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument(
        "--dir", default=None,
        help="parent folder for the files (a temporary folder is made inside it and removed "
        "at the end); default: the current directory, which is not tmpfs unlike /tmp on "
        "some systems",
    )
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    repeats = max(1, args.repeats)

    parent = tempfile.mkdtemp(prefix="hardtrain-ckpt-bench-", dir=args.dir or os.getcwd())
    fstype = filesystem_type(parent)
    print(f"# Checkpoint I/O benchmark\n\ntorch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; files in {parent} ({fstype}); "
          f"median of {repeats} runs after 1 warm-up run; page cache warm for loads.")
    if fstype in ("tmpfs", "ramfs"):
        print("WARNING: that folder is in memory: write times are not disk times.")
    results = []
    try:
        for size in sizes:
            results.append(run_size(size, parent, repeats))
            gc.collect()
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    print_targets(results)
    print(
        "\nratio = (seconds per byte of the row) / (seconds per byte of its reference); "
        "< 1 is faster. Targets are reported, never enforced."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
