"""The tiny training job behind the legacy-checkpoint fixture, shared by make_fixture.py
(which ran it with the code of revision e5e9604) and test_legacy_checkpoint.py (which
resumes it with the current code). Change nothing here that changes the numbers or what
is saved: the committed fixture and expected.* were made with exactly this job.

A Linear(4,8)-ReLU-Linear(8,1) MLP, AdamW, StepLR, a shuffled DataLoader with its own
generator (20 samples, 5 batches an epoch: the data position and that generator's state
are in every checkpoint), one stateful object in extra_state (``Attempts``), checkpoints
every 2 steps with keep_last=2, and every other policy at its default. ``step_fn``
returns a NaN loss at attempt ``NAN_ATTEMPT``: the NaN policy skips that step (its batch
is used up, the step count does not advance).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import hardtrain as ht

REVISION = "e5e9604"  # the code that wrote the fixture
FIXTURE = Path(__file__).with_name(f"checkpoint-{REVISION}")
FIXTURE_RUN = FIXTURE / "run"  # the run folder at step SAVED_STEP, as that code left it
EXPECTED_JSON = FIXTURE / "expected.json"
EXPECTED_TENSORS = FIXTURE / "expected.safetensors"
SAVED_STEP = 6  # K: the fixture's newest checkpoint
FINAL_STEP = 10  # M: the continuation trains to here
NAN_ATTEMPT = 3  # step_fn's 3rd call (the attempt at step 3) returns NaN
SEED = 1234
CONFIG = {"job": "legacy-checkpoint-fixture", "lr": 0.05, "batch_size": 4,
          "step_size": 3, "gamma": 0.5}


class Attempts:
    """extra_state: counts step_fn's calls and sums the finite losses it returned (a
    tensor, so the extra state has both JSON and tensor parts)."""

    def __init__(self) -> None:
        self.count = 0
        self.loss_sum = torch.zeros(())

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "loss_sum": self.loss_sum.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.loss_sum = state["loss_sum"].clone()


@dataclass
class Job:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    attempts: Attempts
    data: DataLoader[Any]
    trainer: ht.HardenedTrainer

    def step_fn(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        self.attempts.count += 1
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        if self.attempts.count == NAN_ATTEMPT:
            return loss * float("nan")  # a bad step: NaN loss and gradients
        self.attempts.loss_sum = self.attempts.loss_sum + loss.detach()
        return loss

    def fit(self, max_steps: int) -> ht.FitResult:
        return self.trainer.fit(self.step_fn, max_steps=max_steps)

    def final_tensors(self) -> dict[str, torch.Tensor]:
        """The model's, the optimizer's and the extra state's tensors, by name, read from
        the live objects (not from the checkpoint files, whose layout may change)."""
        tensors = {f"model.{k}": v.detach().clone().contiguous()
                   for k, v in self.model.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.state.{index}.{key}"] = value.detach().clone().contiguous()
        tensors["attempts.loss_sum"] = self.attempts.loss_sum.clone().contiguous()
        return tensors

    def final_scalars(self) -> dict[str, Any]:
        """What is not a tensor: the scheduler's state, the counter, the lr."""
        scheduler = {k: v for k, v in self.scheduler.state_dict().items()
                     if isinstance(v, int | float | list | str | bool)}
        return {"step": self.trainer.step, "attempts": self.attempts.count,
                "scheduler": json.loads(json.dumps(scheduler)),
                "lr": self.optimizer.param_groups[0]["lr"]}


def build(run_dir: str | os.PathLike[str], *,
          metadata: ht.MetadataPolicy | None = None) -> Job:
    """The job, fresh: the same weights, data and settings on every call."""
    torch.manual_seed(SEED)  # the initial weights (a resume replaces them anyway)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=CONFIG["lr"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=CONFIG["step_size"],
                                                gamma=CONFIG["gamma"])
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(20, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(20, 1, generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=CONFIG["batch_size"], shuffle=True,
                      generator=torch.Generator().manual_seed(SEED + 1))
    attempts = Attempts()
    trainer = ht.HardenedTrainer(
        model, optimizer, data, run_dir,
        scheduler=scheduler,
        extra_state={"attempts": attempts},
        checkpoint=ht.CheckpointPolicy(every=None, every_steps=2, keep_last=2),
        metadata=metadata if metadata is not None else ht.MetadataPolicy(),
        seed=SEED,
        config=CONFIG,
    )
    return Job(model, optimizer, scheduler, attempts, data, trainer)


