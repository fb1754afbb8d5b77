"""A small MLP on a synthetic regression task: the shortest complete hardtrain job (CPU, seconds).

    python examples/train_mlp.py --run-dir runs/mlp --steps 500

Kill it at any moment and run the same command: it resumes from the newest checkpoint
that verifies and ends with the same weights, bit for bit, as a run never interrupted.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hardtrain as ht


def make_dataset(num_samples: int = 4096, dim: int = 16) -> TensorDataset:
    """y = a fixed nonlinear function of x, plus noise. Its own generator: the same data in
    every run, whatever the seed."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, dim, generator=g)
    y = (x[:, : dim // 2].sin() * x[:, dim // 2 :]).sum(1, keepdim=True)
    return TensorDataset(x, y + 0.1 * torch.randn(y.shape, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir",
                        default=os.environ.get("HARDTRAIN_RUN_DIR", "runs/train_mlp"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    # Short, so that a demo kill loses seconds; on a real job use minutes ("30min").
    parser.add_argument("--save-every", default="5s", help='wall-clock interval, e.g. "30min"')
    parser.add_argument("--save-every-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # Before anything random: a fresh start must be reproducible. A resume then replaces
    # the weights and every RNG stream with the checkpoint's.
    ht.seed_everything(args.seed)
    model = nn.Sequential(
        nn.Linear(16, 128), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(128, 128), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(128, 1),
    )
    loader = DataLoader(make_dataset(), batch_size=args.batch_size, shuffle=True,
                        drop_last=True, num_workers=args.workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    trainer = ht.HardenedTrainer(
        model, optimizer, loader, args.run_dir, scheduler=scheduler, config=vars(args),
        checkpoint=ht.CheckpointPolicy(every=args.save_every, every_steps=args.save_every_steps),
    )

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    result = trainer.fit(step_fn, args.steps, max_grad_norm=1.0)

    loss = "n/a (already finished)" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"train_mlp: step {result.step}/{args.steps}, resumed_from={result.resumed_from}, "
          f"{result.num_steps} steps in {result.elapsed_s:.1f}s, final loss {loss}")


if __name__ == "__main__":
    main()
