"""A small training job that checkpoints through hardtrain's CheckpointStore and resumes
exactly after being killed at any instant.

    python examples/train_with_store.py --run-dir runs/demo --steps 300

Each step's loss goes to RUN_DIR/losses.txt; on start the job resumes from the newest
verified checkpoint (model, Adam state, RNG, data position), so a killed and restarted
run ends with the same weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

import hardtrain as ht


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.GELU(),
        nn.Linear(256, 1),
    )


def batch_for(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data stream: batch ``step`` is a pure function of the step, so the data
    position is the step counter."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 32, generator=g)
    return x, x.sin().sum(dim=1, keepdim=True)


def capture(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, per_param in opt["state"].items():
        for key, value in per_param.items():
            tensors[f"optim.{index}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{**g, "betas": list(g["betas"])} for g in opt["param_groups"]]
    return tensors, {"param_groups": groups}


def restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args()

    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    store = ht.CheckpointStore(args.run_dir, keep_last=3)
    step = 0
    try:
        loaded = store.load()  # the newest checkpoint that verifies
    except ht.NoCheckpointError:
        print("no checkpoint yet: starting from scratch", flush=True)
    else:
        restore(model, optimizer, loaded.tensors, loaded.state)
        step = loaded.step
        print(f"resumed from step {step}", flush=True)
    os.makedirs(args.run_dir, exist_ok=True)
    losses_path = os.path.join(args.run_dir, "losses.txt")
    with store, open(losses_path, "a") as losses:
        while step < args.steps:
            x, y = batch_for(step)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            losses.write(f"{step} {loss.item()!r}\n")
            losses.flush()
            if step % args.save_every == 0 or step == args.steps:
                store.save_async(step, *capture(model, optimizer))
    print(f"finished at step {step}", flush=True)


if __name__ == "__main__":
    main()
