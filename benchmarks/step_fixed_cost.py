"""What ``fit`` adds to every step, in microseconds, measured on a tiny model.

step_overhead.py compares whole steps of ~2 ms and ~50 ms; on a noisy machine its ratios
move by more than the few tens of microseconds fit adds. Here the step itself is ~0.5 ms
(a 16x1 linear layer, AdamW, StepLR, batches from a list), so the fixed cost of fit (the
loop, the metrics line, the checkpoint vote, the lr read) stands out. Interleaved runs,
one torch thread; min and median over repetitions. Usage:

    .venv/bin/python benchmarks/step_fixed_cost.py [--steps 3000] [--repeats 7] [--json PATH]

``--json PATH`` also writes the figures (see _results.py); the fit row's ratio there is
fit / plain loop of the same repetition.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from _results import result_row, write_json

import hardtrain as ht


def job() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, list[Any]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 100)
    data = [(torch.randn(8, 16), torch.randn(8, 1)) for _ in range(50)]
    return model, optimizer, scheduler, data


def plain(steps: int) -> float:
    model, optimizer, scheduler, data = job()
    started = time.perf_counter()
    for k in range(steps):
        x, y = data[k % len(data)]
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - started) / steps


def fit(steps: int, run_dir: str) -> float:
    model, optimizer, scheduler, data = job()
    trainer = ht.HardenedTrainer(model, optimizer, data, run_dir, scheduler=scheduler)
    starts: list[float] = []

    def step_fn(batch: Any) -> torch.Tensor:
        starts.append(time.perf_counter())  # start-up and the final save stay out
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    trainer.fit(step_fn, max_steps=steps)
    return (starts[-1] - starts[0]) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plains, fits = [], []
    for _ in range(args.repeats):
        plains.append(plain(args.steps))
        with tempfile.TemporaryDirectory() as run_dir:
            fits.append(fit(args.steps, run_dir))
    rows = [("plain loop", plains), ("fit, default policy", fits)]
    print("| loop | us/step min | us/step median |\n|---|---:|---:|")
    for name, values in rows:
        print(f"| {name} | {min(values) * 1e6:.1f} | {statistics.median(values) * 1e6:.1f} |")
    added_min = (min(fits) - min(plains)) * 1e6
    added_median = (statistics.median(fits) - statistics.median(plains)) * 1e6
    print(f"\nfit adds {added_min:.1f} us per step (min), {added_median:.1f} us (median):")
    for step_ms, target in ((2.0, 0.03), (50.0, 0.01)):
        share = added_median / (step_ms * 1000)
        verdict = "PASS" if share <= target else "FAIL"
        print(f"  at {step_ms:g} ms per step: {share:.2%} (target <= {target:.0%}) {verdict}")
    if args.json:
        ratios = [f / p for f, p in zip(fits, plains, strict=True)]
        rows_json = [result_row("plain loop", plains),
                     result_row("fit, default policy", fits, ratios)]
        write_json(args.json, "step_fixed_cost", rows_json, steps=args.steps,
                   repeats=args.repeats, torch_threads=1)


if __name__ == "__main__":
    main()
