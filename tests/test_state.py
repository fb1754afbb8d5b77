"""Training state to tensors + JSON and back: same values, same types, no pickle."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest
import torch

from hardtrain.state import capture_rng, flatten, restore_rng, unflatten


def roundtrip(obj: Any) -> Any:
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(flatten(obj, "x", tensors), allow_nan=False))
    return unflatten(tree, tensors)


def test_values_and_types_survive() -> None:
    obj = {
        "tuple": (1, 2.5, "a"), 3: "int key", "nan": float("nan"), "inf": float("-inf"),
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3), "dtype": torch.bfloat16,
        "nested": [{"t": torch.ones(2)}, None, True], "$tensor": "a key that looks like a tag",
        "np_scalar": np.float32(1.5),
    }
    back = roundtrip(obj)
    assert back["tuple"] == (1, 2.5, "a") and back[3] == "int key"
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")
    assert back["array"].dtype == np.uint32 and back["array"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["dtype"] is torch.bfloat16
    assert torch.equal(back["nested"][0]["t"], torch.ones(2)) and back["nested"][1:] == [None, True]
    assert back["$tensor"] == "a key that looks like a tag" and back["np_scalar"] == 1.5


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),
    lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[3]),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.9**step),
])
def test_scheduler_states_roundtrip(make: Any) -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    scheduler = make(opt)
    for _ in range(4):
        opt.step()
        scheduler.step(1.0) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) \
            else scheduler.step()
    assert repr(roundtrip(scheduler.state_dict())) == repr(scheduler.state_dict())


def test_optimizer_state_roundtrips_into_a_new_optimizer() -> None:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    fresh = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.95))
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value)


def test_something_unsaveable_is_named() -> None:
    with pytest.raises(TypeError, match=r"x/opener: cannot save a builtins\.builtin_function"):
        flatten({"opener": open}, "x", {})  # type: ignore[dict-item]


def test_rng_streams_continue_exactly() -> None:
    generator = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(flatten(capture_rng({"g": generator}), "rng", tensors)))

    def draw() -> tuple[Any, ...]:
        return (random.random(), float(np.random.rand()), torch.rand(2).tolist(),
                torch.rand(2, generator=generator).tolist())

    first = draw()
    restore_rng(unflatten(tree, tensors), {"g": generator})
    assert draw() == first
