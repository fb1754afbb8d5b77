"""A tiny training job for ``hardtrain torture`` tests: a few milliseconds per step.

    python tiny.py --run-dir DIR [--steps 60] [--every-steps 5] [--keep-last 2] [--sync]
                   [--step-s 0.02] [--workers 0] [--private-rng]
                   [--seed-torch-only]

--step-s sleeps in every step, so that random instants land in training on any machine.
--private-rng adds noise from a module-level ``random.Random(0)`` that no checkpoint
holds: a resumed run draws its numbers again from the start and diverges.
--seed-torch-only seeds torch alone (``torch.manual_seed(0)``, no seed_everything, no
HardenedTrainer seed), as many scripts do: Python's ``random`` and numpy's global
generator start from fresh entropy in every process. Nothing draws from them, so the
losses match; the RNG state that the checkpoints save does not.
--keep-last 0 keeps every checkpoint.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import hardtrain as ht

PRIVATE = random.Random(0)  # state hardtrain cannot see


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default=os.environ.get("HARDTRAIN_RUN_DIR"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every-steps", type=int, default=5)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--sync", action="store_true", help="synchronous saves")
    parser.add_argument("--step-s", type=float, default=0.0, help="sleep in every step")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--private-rng", action="store_true")
    parser.add_argument("--seed-torch-only", action="store_true")
    args = parser.parse_args()
    assert args.run_dir, "--run-dir or HARDTRAIN_RUN_DIR"

    if args.seed_torch_only:
        torch.manual_seed(0)
    else:
        ht.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.9)
    g = torch.Generator().manual_seed(1234)
    dataset = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    data = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=args.workers)
    policy = ht.CheckpointPolicy(every=None, every_steps=args.every_steps,
                                 keep_last=args.keep_last or None, async_save=not args.sync)
    trainer = ht.HardenedTrainer(model, optimizer, data, args.run_dir, scheduler=scheduler,
                                 checkpoint=policy, seed=None if args.seed_torch_only else 7)

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        if args.step_s:
            time.sleep(args.step_s)
        x, y = batch
        if args.private_rng:
            x = x + PRIVATE.random() * 1e-2
        return torch.nn.functional.mse_loss(model(x), y)

    result = trainer.fit(step_fn, max_steps=args.steps)
    print(f"tiny: step {result.step}, resumed_from={result.resumed_from}")


if __name__ == "__main__":
    main()
