"""The demo: train a model, preempt and kill it at random moments, resume it, and check it
bit for bit against a run that was never interrupted.

1. runs/demo/straight: examples/train_gpt.py trains to the end, uninterrupted.
2. runs/demo/killed: the same command from scratch, interrupted --kills times at random
   moments during training and started again with the same command each time, until it
   finishes. The interruptions alternate: SIGTERM (a preemption: the job checkpoints the
   step it is in and exits 143 within its deadline) and SIGKILL (a crash: no chance to
   clean up, mid-step, mid-save, anywhere).
3. The two are compared bit for bit: the loss of every step (the last line logged for it,
   since a step replayed after a resume is logged again) and every tensor of the final
   checkpoint (weights, AdamW moments, LR schedule, RNG streams, data position). Any
   difference exits 1. Both loss curves, kills marked: runs/demo/loss_curves.png.

    python examples/kill_and_resume.py [--kills 3] [--steps 700] [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import hardtrain as ht

EXAMPLE = Path(__file__).with_name("train_gpt.py")


@dataclass
class Start:
    """One start of the killed run."""

    resumed_from: int | None  # None: a fresh start
    killed_in_step: int | None = None  # None: it ran to the end
    signal: str = "SIGKILL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--seed", type=int, default=None,
                        help="picks the kill moments (default: a random seed, printed)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    seed = random.SystemRandom().randrange(10_000) if args.seed is None else args.seed
    rng = random.Random(seed)
    straight, killed = args.out / "straight", args.out / "killed"
    for run_dir in (straight, killed):
        shutil.rmtree(run_dir, ignore_errors=True)
    # A shuffled DataLoader with a worker process: the resumed run must get every batch in
    # the same order, across an epoch boundary, from a worker started afresh.
    command = [sys.executable, str(EXAMPLE), "--steps", str(args.steps), "--workers", "1",
               "--sample-chars", "0"]
    print(f"hardtrain demo: {EXAMPLE.name}, {args.steps} steps, {args.kills} interruptions "
          f"(SIGTERM and SIGKILL in turn) at random moments (--seed {seed})\n")

    print(f"1. uninterrupted run -> {straight}")
    started = time.perf_counter()
    print("  ", train(command, straight, kill_after=None, rng=rng)[1])
    print(f"   ({time.perf_counter() - started:.0f} s)\n")

    print(f"2. the same run from scratch -> {killed}, interrupted {args.kills} times")
    started = time.perf_counter()
    # One kill in each of --kills equal stretches of training, at a random step in it.
    lo, hi = args.steps // 5, args.steps * 9 // 10
    bounds = [lo + (hi - lo) * i // args.kills for i in range(args.kills + 1)]
    planned = [rng.randrange(a, b) for a, b in itertools.pairwise(bounds)]
    starts: list[Start] = []
    for kill_after in [*planned, None]:
        if starts and starts[-1].killed_in_step is None:
            break  # the previous start finished before its kill
        if kill_after is not None and starts:  # past the last kill: every start makes progress
            kill_after = max(kill_after, starts[-1].killed_in_step or 0)
        sig = signal.SIGTERM if len(starts) % 2 == 0 else signal.SIGKILL
        last_logged, output = train(command, killed, kill_after=kill_after, rng=rng, sig=sig)
        start = Start(starts_in_events(killed)[len(starts)], signal=sig.name)
        starts.append(start)
        where = "fresh start" if start.resumed_from is None else (
            f"resumed at step {start.resumed_from}")
        if last_logged is None:
            print(f"   start {len(starts)}: {where:<21} -> {output}")
            continue
        newest = ht.CheckpointStore(killed).latest()
        saved = f"newest checkpoint: {'none' if newest is None else f'step {newest.step}'}"
        if sig == signal.SIGTERM:
            start.killed_in_step = last_logged
            print(f"   start {len(starts)}: {where:<21} -> SIGTERM: {output}; {saved}")
        else:
            start.killed_in_step = last_logged + 1
            print(f"   start {len(starts)}: {where:<21} -> SIGKILL in step "
                  f"{start.killed_in_step}; {saved}")
    print(f"   ({time.perf_counter() - started:.0f} s)\n")

    print("3. comparing the two runs, bit for bit")
    same = compare(straight, killed, starts)
    plot(args.out / "loss_curves.png", losses(straight), losses(killed), starts)
    kills = ", ".join(str(s.killed_in_step) for s in starts if s.killed_in_step is not None)
    if not same:
        print(f"\nDIFFERENT: the run interrupted in steps {kills} and resumed is not the "
              "uninterrupted run (see above).")
        return 1
    print(f"\nBIT-EXACT: interrupted in steps {kills} and resumed each time, the run ended with "
          "every loss and every tensor of its final checkpoint identical to the "
          "uninterrupted run.")
    return 0


def train(command: list[str], run_dir: Path, *, kill_after: int | None,
          rng: random.Random, sig: signal.Signals = signal.SIGKILL) -> tuple[int | None, str]:
    """Start the training command once. With ``kill_after``: once this start has logged
    that step, send it ``sig`` a random instant later (up to 0.1 s: mid-step or mid-save).
    Returns the last step this start logged if it was interrupted (else None), and its
    output (for SIGTERM: what its ``preempted`` event says).
    """
    metrics = run_dir / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.exists() else 0  # earlier starts' lines
    # One thread unless OMP_NUM_THREADS says otherwise: this small model gains little from
    # more, and a thread pool larger than the idle cores slows every step several times.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([*command, "--run-dir", str(run_dir)], stdout=subprocess.PIPE,
                            text=True, env=env)
    while kill_after is not None and proc.poll() is None:
        if max(logged_steps(metrics, offset), default=0) >= kill_after:
            time.sleep(rng.uniform(0, 0.1))
            proc.send_signal(sig)
            code = proc.wait()  # not communicate(): an orphaned loader worker holds stdout open
            assert proc.stdout is not None
            proc.stdout.close()
            if sig != signal.SIGTERM:
                return max(logged_steps(metrics, offset)), ""
            if code != 128 + signal.SIGTERM:
                raise SystemExit(f"{' '.join(command)} exited with {code} after SIGTERM, "
                                 f"not 143 (see {run_dir / 'events.jsonl'})")
            stop = preempted_event(run_dir)
            return stop["step"], (f"stopped after step {stop['step']}, "
                                  f"{'saved it' if stop['saved'] else 'not saved'}, "
                                  f"exit {code} in {stop['since_signal_s']:.2f} s")
        time.sleep(0.01)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {proc.returncode}:\n{out}")
    return None, out.strip()


def preempted_event(run_dir: Path) -> dict[str, Any]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "preempted"][-1]


def logged_steps(metrics: Path, offset: int) -> list[int]:
    """The steps in metrics.jsonl after byte ``offset`` (a line cut short is skipped)."""
    if not metrics.exists():
        return []
    with metrics.open("rb") as f:
        f.seek(offset)
        lines = f.read().split(b"\n")[:-1]
    return [json.loads(line)["step"] for line in lines]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; the last line written for each step (a replayed step is written again)."""
    found: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        found[entry["step"]] = entry["loss"]
    return found


def starts_in_events(run_dir: Path) -> list[int | None]:
    """For each start of the run, in order: the checkpoint step it resumed from, or None for
    a fresh start (from events.jsonl)."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e.get("from_step") for e in events if e["event"] in ("training_started", "resumed")]


def compare(straight: Path, killed: Path, starts: list[Start]) -> bool:
    """Print both runs' fingerprints side by side and every difference; True if none."""
    a, b = losses(straight), losses(killed)
    loss_diffs = [s for s in sorted(a.keys() | b.keys()) if a.get(s) != b.get(s)]
    ca, cb = ht.CheckpointStore(straight).load(), ht.CheckpointStore(killed).load()
    names = sorted(ca.tensors.keys() | cb.tensors.keys())
    tensor_diffs = [n for n in names if n not in ca.tensors or n not in cb.tensors
                    or not torch.equal(ca.tensors[n], cb.tensors[n])]
    state_diffs = json_differences(ca.state, cb.state)
    kills = sum(s.killed_in_step is not None for s in starts)
    print(f"   {'':<34}{'uninterrupted':<22}interrupted {kills}x, resumed")
    rows = [(f"loss curve ({len(a)} steps)", curve_digest(a), curve_digest(b)),
            (f"final checkpoint ({len(ca.tensors)} tensors)",
             tensors_digest(ca.tensors), tensors_digest(cb.tensors))]
    for label, da, db in rows:
        print(f"   {label:<34}{'sha256 ' + da[:12]:<22}sha256 {db[:12]}"
              f"  {'same' if da == db else 'DIFFERENT'}")
    print(f"   losses equal (==): {len(a) - len(loss_diffs)} of {len(a)} steps; tensors equal "
          f"(torch.equal): {len(names) - len(tensor_diffs)} of {len(names)}")
    print(f"   final step: {ca.step} and {cb.step}; the checkpoint's other state (JSON): "
          f"{'equal' if not state_diffs else 'DIFFERENT'}")
    for step in loss_diffs[:5]:
        print(f"   step {step}: loss {a.get(step)!r} vs {b.get(step)!r}")
    for name in tensor_diffs[:5]:
        print(f"   tensor {name} differs")
    for difference in state_diffs[:5]:
        print(f"   {difference}")
    return not (loss_diffs or tensor_diffs or state_diffs) and ca.step == cb.step


def json_differences(a: Any, b: Any, path: str = "state") -> list[str]:
    """Where two JSON trees differ, as 'path: value vs value'."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in
                json_differences(a.get(k, "(absent)"), b.get(k, "(absent)"), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in json_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r:.60} vs {b!r:.60}"]


def curve_digest(curve: dict[int, float]) -> str:
    text = "\n".join(f"{step} {loss!r}" for step, loss in sorted(curve.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name} {t.dtype} {list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plot(path: Path, straight: dict[int, float], killed: dict[int, float],
         starts: list[Start]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("   no plot: matplotlib is missing (pip install -e '.[examples]')")
        return
    fig, (curves, diff) = plt.subplots(2, 1, sharex=True, figsize=(10, 6),
                                       height_ratios=[3, 1], layout="constrained")
    steps = sorted(straight)
    curves.plot(steps, [straight[s] for s in steps], color="tab:blue", lw=4, alpha=0.35,
                label="uninterrupted")
    ksteps = sorted(killed)
    curves.plot(ksteps, [killed[s] for s in ksteps], color="black", lw=0.7,
                label="interrupted and resumed (last value logged per step)")
    for i, (start, after) in enumerate(itertools.pairwise(starts)):
        if start.killed_in_step is None:
            continue
        curves.axvspan(after.resumed_from or 0, start.killed_in_step, color="tab:red", alpha=0.12,
                       label="replayed after the restart" if i == 0 else None)
        curves.axvline(start.killed_in_step, color="tab:red", ls="--", lw=1.2,
                       label="interruption (SIGTERM or SIGKILL)" if i == 0 else None)
        curves.annotate(f"{start.signal} {i + 1}\nstep {start.killed_in_step}",
                        (start.killed_in_step, 0.97), xycoords=("data", "axes fraction"),
                        xytext=(4, 0), textcoords="offset points", va="top", fontsize=8,
                        color="tab:red")
    curves.set_ylabel("training loss")
    curves.set_title(f"{EXAMPLE.name}: uninterrupted vs interrupted and resumed")
    curves.legend(loc="upper right", bbox_to_anchor=(1.0, 0.85), fontsize=8)
    common = [s for s in steps if s in killed]
    delta = [killed[s] - straight[s] for s in common]
    diff.plot(common, delta, color="black", lw=1)
    exact = all(d == 0 for d in delta) and len(common) == len(steps)
    if exact:
        diff.set_ylim(-1, 1)
    diff.set_ylabel("difference")
    diff.set_xlabel("step")
    diff.set_title("interrupted minus uninterrupted: "
                   + ("exactly 0 at every step" if exact else "NOT ZERO"), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"   plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
