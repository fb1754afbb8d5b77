"""One rank of a DDP training job under torchrun, for the resume tests.

Every rank appends its own per-step losses to RESULTS/rank<R>.jsonl. --kill-rank R
--kill-at K SIGKILLs rank R inside step K+1 (torchrun then stops the other rank), only in
torchrun's first attempt with --first-attempt-only. --term-rank R --term-at K sends rank R
SIGTERM inside step K+1. --nan-rank R --nan-at K gives rank R a NaN loss once, in step K+1.
--stop-file PATH --stop-rank R --stop-at K: the trainer has the example StopFile feature
(tests/features/stop_file.py) watching PATH ({rank}: each rank its own), and rank R
creates its file in step K+1. --fail-rank R --fail-steps A,B: rank R's storage fails
(EIO) every write of the checkpoints of steps A and B.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hardtrain as ht

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests.*
from tests.features.stop_file import StopFileTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("results")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--first-attempt-only", action="store_true")
    parser.add_argument("--term-rank", type=int, default=None)
    parser.add_argument("--term-at", type=int, default=None)
    parser.add_argument("--nan-rank", type=int, default=None)
    parser.add_argument("--nan-at", type=int, default=None)
    parser.add_argument("--deep", action="store_true", help="6 layers in 3 small DDP buckets")
    parser.add_argument("--stop-file", default=None)
    parser.add_argument("--stop-rank", type=int, default=None)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-steps", default="")
    args = parser.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    if rank == args.fail_rank:
        fail_writes([int(s) for s in args.fail_steps.split(",") if s])
    ht.seed_everything(0)
    if args.deep:
        layers = [torch.nn.Linear(6, 64)] + [torch.nn.Linear(64, 64) for _ in range(4)]
        model = torch.nn.Sequential(*layers, torch.nn.Dropout(0.25), torch.nn.Linear(64, 1))
    else:
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.25),
                                    torch.nn.Linear(16, 1))
    buckets = {"bucket_cap_mb": 0.02} if args.deep else {}
    ddp = DistributedDataParallel(model, **buckets) if distributed else model
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    g = torch.Generator().manual_seed(5)
    dataset = TensorDataset(torch.randn(48, 6, generator=g), torch.randn(48, 1, generator=g))
    sampler = DistributedSampler(dataset, shuffle=True, seed=11) if distributed else None
    data = DataLoader(dataset, batch_size=4, sampler=sampler, shuffle=sampler is None)
    extra = {} if args.stop_file is None else {"stop_file": args.stop_file}
    trainer = (ht.HardenedTrainer if args.stop_file is None else StopFileTrainer)(
        ddp, optimizer, data, args.run_dir, scheduler=scheduler, seed=100 + rank, **extra,
        checkpoint=ht.CheckpointPolicy(every=None, every_steps=3, keep_last=2),
        metadata=ht.MetadataPolicy(repo=args.run_dir),  # not the checkout: edits would show
    )
    log = Path(args.results) / f"rank{rank}.jsonl"

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    nan_given: list[bool] = []
    kill = not (args.first_attempt_only and attempt > 0)

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        if kill and rank == args.kill_rank and trainer.step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == args.stop_rank and trainer.step == args.stop_at:
            Path(args.stop_file.format(rank=rank)).touch()
        if rank == args.term_rank and trainer.step == args.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        if rank == args.nan_rank and trainer.step == args.nan_at and not nan_given:
            nan_given.append(True)
            loss = loss * float("nan")
        with log.open("a") as f:
            f.write(json.dumps({"step": trainer.step + 1, "loss": loss.item()}) + "\n")
        return loss

    result = trainer.fit(step_fn, max_steps=args.steps)
    print(f"rank={rank} step={result.step} resumed_from={result.resumed_from}", flush=True)
    if distributed:
        dist.destroy_process_group()


def fail_writes(steps: list[int]) -> None:
    """This rank's storage fails every write into the folders of ``steps``."""
    import errno

    from hardtrain.checkpoint import _storage

    write = _storage.LocalStorage.write_tensors

    def failing(self, path, tensors, check=_storage.never_stop):  # type: ignore[no-untyped-def]
        if any(f"step-{s:08d}" in path for s in steps):
            raise OSError(errno.EIO, "Input/output error")
        return write(self, path, tensors, check)

    _storage.LocalStorage.write_tensors = failing  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
