"""The demo: a training run that survives being killed, checked bit for bit.

1. Runs examples/train_with_store.py to the end without interruption.
2. Runs it again from scratch, SIGKILLs it at random instants (no chance to clean up:
   mid-step, mid-save, anywhere), and restarts it each time until it finishes.
3. Compares the two runs: the loss at every step and every tensor of the final
   checkpoint must be equal, bit for bit. Exits 1 if they are not.

    python examples/kill_and_resume.py [--kills 3] [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import hardtrain as ht

SCRIPT = Path(__file__).with_name("train_with_store.py")


def run(run_dir: Path, steps: int, kill_at: int | None) -> bool:
    """Run the job once; SIGKILL it once it has logged step ``kill_at``. True if it
    finished."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--steps", str(steps)],
        stdout=subprocess.PIPE, text=True,
    )
    while kill_at is not None and proc.poll() is None:
        if max(losses(run_dir), default=0) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return False
        time.sleep(0.005)
    proc.wait()
    assert proc.stdout is not None
    print("   ", " | ".join(proc.stdout.read().split("\n")).strip(" |"))
    if proc.returncode != 0:
        raise SystemExit(f"training exited with {proc.returncode}")
    return True


def losses(run_dir: Path) -> dict[int, str]:
    """The loss of each step; a step replayed after a kill keeps its last value."""
    result = {}
    path = run_dir / "losses.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        if " " in line:  # a line cut short by a kill is rewritten by the replayed step
            step, _, loss = line.partition(" ")
            result[int(step)] = loss
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="hardtrain-demo-"))

    print(f"1. uninterrupted run ({args.steps} steps) in {work / 'clean'}")
    run(work / "clean", args.steps, None)

    print(f"2. the same run, SIGKILLed {args.kills} times at random instants")
    interrupted = work / "killed"
    kill_steps = sorted(rng.sample(range(1, args.steps), args.kills))
    for kills, kill_at in enumerate(kill_steps, start=1):
        run(interrupted, args.steps, kill_at)
        infos = ht.CheckpointStore(interrupted).list()
        newest = infos[-1].step if infos else None
        print(f"   kill {kills} at step ~{kill_at}: newest committed checkpoint is step "
              f"{newest}; restarting")
    run(interrupted, args.steps, None)
    kills = len(kill_steps)

    print("3. comparing the two runs")
    clean_losses, killed_losses = losses(work / "clean"), losses(interrupted)
    diverged = [s for s in clean_losses if clean_losses[s] != killed_losses.get(s)]
    clean = ht.CheckpointStore(work / "clean").load().tensors
    resumed = ht.CheckpointStore(interrupted).load().tensors
    different = [k for k in clean if not torch.equal(clean[k], resumed[k])]
    print(f"   losses compared: {len(clean_losses)} steps, {len(diverged)} differ")
    print(f"   final tensors compared: {len(clean)}, {len(different)} differ")
    if diverged or different:
        print(f"DIVERGED: first step {diverged[:1]}, tensors {different[:3]}")
        return 1
    print(f"BIT-EXACT: {kills} kills survived; final weights and every loss are identical.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
