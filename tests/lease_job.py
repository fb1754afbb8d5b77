"""A small training job for the lease tests (tests/test_lease.py), run as a real process.

    python lease_job.py --run-dir DIR [--steps 20] [--every-steps 5] [--heartbeat 30]
                        [--hold-at K --ready PATH]

--hold-at K: inside step K+1, write PATH and stay there (until killed; it gives up with
exit code 3 after two minutes), so that a test can start a second job beside a live one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import hardtrain as ht


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every-steps", type=int, default=5)
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--hold-at", type=int, default=None)
    parser.add_argument("--ready", default=None)
    args = parser.parse_args()

    ht.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1234)
    dataset = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    data = DataLoader(dataset, batch_size=8, shuffle=True)
    policy = ht.CheckpointPolicy(every=None, every_steps=args.every_steps, keep_last=2,
                                 heartbeat=args.heartbeat)
    trainer = ht.HardenedTrainer(model, optimizer, data, args.run_dir, checkpoint=policy,
                                 seed=7)

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        if args.hold_at is not None and trainer.step == args.hold_at:
            Path(args.ready).write_text("holding\n")
            time.sleep(120)  # the test kills this process long before
            sys.exit(3)
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    result = trainer.fit(step_fn, max_steps=args.steps)
    print(f"done step={result.step} resumed_from={result.resumed_from}")


if __name__ == "__main__":
    main()
