"""Data-parallel training under torchrun: DDP, a DistributedSampler, one checkpoint for all ranks.

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --run-dir runs/ddp --steps 300

gloo on CPU, nccl when CUDA is there (one GPU per rank). Every rank saves its own files
into one checkpoint that rank 0 commits once all have written. Kill the job (or one
rank: torchrun then stops the others) and run the same command: every rank resumes from
the newest checkpoint that verifies on every rank. The run directory must be storage
that every rank sees (a shared disk, or an s3:// URL).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hardtrain as ht


def make_dataset(num_samples: int = 8192, dim: int = 32, num_classes: int = 4) -> TensorDataset:
    """Points labelled by a fixed random projection. Its own generator: the same data on
    every rank and in every run."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, dim, generator=g)
    labels = (x @ torch.randn(dim, num_classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir",
                        default=os.environ.get("HARDTRAIN_RUN_DIR", "runs/ddp_torchrun"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    # Short, so that a demo kill loses seconds; on a real job use minutes ("30min").
    parser.add_argument("--save-every", default="5s", help='wall-clock interval, e.g. "30min"')
    parser.add_argument("--save-every-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        # The same seed everywhere: every rank builds the same initial weights.
        ht.seed_everything(args.seed)
        model = nn.Sequential(
            nn.Linear(32, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 4)
        ).to(device)
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
        dataset = make_dataset()
        # Each rank reads its own shard, reshuffled every epoch (hardtrain calls set_epoch).
        sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                            drop_last=True, pin_memory=cuda)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

        trainer = ht.HardenedTrainer(
            ddp, optimizer, loader, args.run_dir, scheduler=scheduler, config=vars(args),
            checkpoint=ht.CheckpointPolicy(every=args.save_every,
                                           every_steps=args.save_every_steps),
            # A fresh start reseeds each rank differently, so that dropout masks differ
            # across ranks; a resume restores each rank's own RNG streams.
            seed=args.seed + rank,
        )

        def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
            x, y = (t.to(device, non_blocking=True) for t in batch)
            return nn.functional.cross_entropy(ddp(x), y)  # DDP averages the gradients

        result = trainer.fit(step_fn, args.steps, max_grad_norm=1.0)

        if rank == 0:
            loss = ("n/a (already finished)" if result.final_loss is None
                    else f"{result.final_loss:.4f} (rank 0)")
            print(f"ddp_torchrun: {dist.get_world_size()} ranks, step {result.step}/{args.steps}, "
                  f"resumed_from={result.resumed_from}, {result.num_steps} steps in "
                  f"{result.elapsed_s:.1f}s, final loss {loss}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
