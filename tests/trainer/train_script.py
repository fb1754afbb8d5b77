"""A small training job for resume tests, run as a real process.

Faults are keyed by step: --kill-at K SIGKILLs the process inside step K+1's step_fn;
--kill-in-save K SIGKILLs it while the checkpoint after step K is being written;
--term-at K sends it SIGTERM inside step K+1; --term-in-save K sends SIGTERM while the
checkpoint after step K is being written (--slow-write S: that write takes S seconds more
after the signal, slow storage); --term-in-resume sends SIGTERM while the checkpoint is
being loaded;
--term-twice sends a second SIGTERM while the preemption's own save is being written;
--term-group sends --term-at's SIGTERM to the whole process group (DataLoader workers
included), as torchrun and SLURM do.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import hardtrain as ht


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Numbers:
    """A plain iterable: no state_dict, not a DataLoader."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self.dataset), 8):
            yield self.dataset[i : i + 8]


def make_data(kind: str, workers: int) -> object:
    g = torch.Generator().manual_seed(1234)
    dataset = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    if kind == "loader":
        return DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers)
    if kind == "persistent":
        return DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers,
                          persistent_workers=True)
    if kind == "batch-sampler":
        batches = BatchSampler(RandomSampler(dataset), batch_size=8, drop_last=False)
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers)
    return Numbers(dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default="loader",
                        choices=["loader", "persistent", "batch-sampler", "stateful", "iterable"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--every-steps", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--term-at", type=int, default=None)
    parser.add_argument("--term-in-save", type=int, default=None)
    parser.add_argument("--slow-write", type=float, default=0.0)
    parser.add_argument("--term-in-resume", action="store_true")
    parser.add_argument("--term-twice", action="store_true")
    parser.add_argument("--term-group", action="store_true")
    parser.add_argument("--deadline", type=float, default=25.0)
    args = parser.parse_args()

    ht.seed_everything(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.8)
    data = make_data(args.data, args.workers)
    policy = ht.CheckpointPolicy(every=None, every_steps=args.every_steps, keep_last=2,
                                 async_save=not args.sync)
    trainer = ht.HardenedTrainer(model, optimizer, data, args.run_dir, scheduler=scheduler,
                                 checkpoint=policy, seed=7,
                                 preemption=ht.PreemptionPolicy(deadline=args.deadline))
    faults = {"term_in_save": args.term_in_save, "term_twice": args.term_twice}

    from hardtrain.checkpoint import _storage

    write = _storage.LocalStorage.write_tensors

    def slow(seconds: float, check) -> None:  # type: ignore[no-untyped-def]
        """Slow storage, written in pieces: an abandoned save stops within one, as the
        real writer does."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            check()
            time.sleep(0.005)  # a piece of slow storage, not waiting for anything

    def write_with_faults(self, path, tensors, check=lambda: None):  # type: ignore[no-untyped-def]
        if args.kill_in_save is not None and trainer.step > args.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        if faults["term_in_save"] is not None and trainer.step > faults["term_in_save"]:
            faults["term_in_save"] = None
            os.kill(os.getpid(), signal.SIGTERM)
            slow(args.slow_write, check)
        elif faults["term_twice"] and args.term_at is not None and trainer.step > args.term_at:
            faults["term_twice"] = False
            os.kill(os.getpid(), signal.SIGTERM)
        return write(self, path, tensors, check)

    _storage.LocalStorage.write_tensors = write_with_faults  # type: ignore[method-assign]

    if args.term_in_resume:
        load = ht.CheckpointStore.load

        def load_after_term(self, *a, **kw):  # type: ignore[no-untyped-def]
            os.kill(os.getpid(), signal.SIGTERM)
            return load(self, *a, **kw)

        ht.CheckpointStore.load = load_after_term  # type: ignore[method-assign]

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        if args.kill_at is not None and trainer.step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.term_at is not None and trainer.step == args.term_at:
            if args.term_group:
                os.killpg(os.getpgid(0), signal.SIGTERM)
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        noise = float(np.random.randn()) * 1e-3 + random.random() * 1e-3
        return torch.nn.functional.mse_loss(model(x + noise), y)

    result = trainer.fit(step_fn, max_steps=args.steps, grad_accum_steps=args.accum)
    print(f"done step={result.step} resumed_from={result.resumed_from}")


if __name__ == "__main__":
    main()
