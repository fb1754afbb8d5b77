"""Training state as flat tensors plus JSON, and back, with no pickle.

``flatten`` turns a ``state_dict()``-style tree into a JSON tree in which every tensor is
replaced by a reference to a name in a flat ``{name: tensor}`` mapping (what the
checkpoint store writes as safetensors). Tuples, non-string dict keys, non-finite floats,
numpy arrays and dtypes are tagged so that ``unflatten`` gives back the same values and
types. Anything else is a TypeError naming where it was found.

The RNG streams (``capture_rng``/``restore_rng``): Python's ``random``, numpy's global
generator, torch's CPU generator, every CUDA device's generator, and any extra
``torch.Generator`` passed by name (those of samplers and data loaders).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_TAGS = ("$tensor", "$tuple", "$items", "$float", "$ndarray", "$dtype")


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able tree for ``obj``; its tensors go into ``tensors`` under ``prefix/...``."""
    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise ValueError(f"two tensors would be saved as {prefix!r}; rename one of them")
        tensors[prefix] = obj.detach()
        return {"$tensor": prefix}
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": [obj.dtype.str, list(obj.shape), obj.ravel().tolist()]}
    if isinstance(obj, np.generic):
        return flatten(obj.item(), prefix, tensors)
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"$tuple": [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: flatten(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"$items": [
            [flatten(k, f"{prefix}/key{i}", tensors), flatten(v, f"{prefix}/{k}", tensors)]
            for i, (k, v) in enumerate(obj.items())
        ]}
    raise TypeError(
        f"{prefix}: cannot save a {type(obj).__module__}.{type(obj).__qualname__} "
        f"({obj!r:.80}); hardtrain saves tensors and JSON values (numbers, strings, lists, "
        "dicts, tuples, numpy arrays). Return one of those from state_dict()."
    )


def unflatten(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``flatten``."""
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, value), = tree.items()
        if tag == "$tensor":
            return tensors[value]
        if tag == "$tuple":
            return tuple(unflatten(v, tensors) for v in value)
        if tag == "$items":
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in value}
        if tag == "$float":
            return float(value)
        if tag == "$ndarray":
            dtype, shape, data = value
            return np.array(data, dtype=np.dtype(dtype)).reshape(shape)
        if tag == "$dtype":
            return getattr(torch, value)
    return {k: unflatten(v, tensors) for k, v in tree.items()}


def tensor_names(tree: Any) -> set[str]:
    """Every tensor name a flattened tree refers to."""
    if isinstance(tree, list):
        return set().union(*map(tensor_names, tree)) if tree else set()
    if isinstance(tree, dict):
        if len(tree) == 1 and "$tensor" in tree:
            return {tree["$tensor"]}
        return set().union(*map(tensor_names, tree.values())) if tree else set()
    return set()


# ---------------------------------------------------------------------------- RNG streams


def capture_rng(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """The state of every RNG stream, as a ``flatten``-able tree."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Put every stream back as ``capture_rng`` found it (an unflattened tree)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state:
        cuda = state["cuda"]
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(
                f"the checkpoint holds RNG state for {len(cuda)} CUDA device(s), this process "
                f"sees {found}; resume on the same devices (CUDA_VISIBLE_DEVICES) to continue "
                "exactly"
            )
        torch.cuda.set_rng_state_all(cuda)

