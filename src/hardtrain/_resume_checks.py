"""Does a checkpoint fit the trainer that loads it? Each function lists the differences
it finds, as sentences for one CheckpointMismatchError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def model_differences(current: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    found = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        found.append(f"model keys missing from the checkpoint: {_some(missing)}")
    if unexpected:
        found.append(f"unexpected model keys in the checkpoint: {_some(unexpected)}")
    for key in sorted(current.keys() & saved.keys()):
        now, then = current[key], saved[key]
        if isinstance(now, torch.Tensor) and isinstance(then, torch.Tensor) and (
            now.shape != then.shape or now.dtype != then.dtype
        ):
            found.append(f"model {key}: checkpoint has {then.dtype} {list(then.shape)}, the "
                         f"model has {now.dtype} {list(now.shape)}")
    return found


def signature_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    found = []
    for part, label in [("optimizers", "optimizer"), ("schedulers", "scheduler"),
                        ("scaler", "scaler"), ("extra_state", "extra_state"),
                        ("data", "data"), ("data_generators", "data generators")]:
        then, now = saved.get(part), current.get(part)
        if then == now:
            continue
        if isinstance(then, dict) and isinstance(now, dict) and then.keys() == now.keys():
            for name in then:
                if then[name] != now[name]:
                    found.append(f"{label} {name!r}: {_describe(then[name], now[name])}")
        else:
            found.append(f"{label}: checkpoint has {then}, this trainer has {now}")
    return found


def device_differences(saved_rng: Mapping[str, Any]) -> list[str]:
    """The CUDA RNG states saved must fit the devices this process sees."""
    if "cuda" not in saved_rng:
        return []
    saved, found = len(saved_rng["cuda"]), torch.cuda.device_count()
    if saved == found:
        return []
    return [f"RNG state for {saved} CUDA device(s), this process sees {found} (resume with the "
            "same CUDA_VISIBLE_DEVICES)"]


def _describe(then: Any, now: Any) -> str:
    if isinstance(then, dict) and isinstance(now, dict):
        if then.get("class") != now.get("class"):
            return f"checkpoint has {then.get('class')}, this trainer has {now.get('class')}"
        return (f"parameter shapes differ (checkpoint {then.get('param_shapes')}, this "
                f"trainer {now.get('param_shapes')})")
    return f"checkpoint has {then}, this trainer has {now}"


def _some(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
