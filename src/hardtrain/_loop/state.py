"""The user's objects as the loop holds them, and their capture into a checkpoint and back.

``UserState`` owns the model, optimizers, schedulers, scaler, extra state, the data
cursor and the step count. ``capture`` flattens all of it (and the RNG streams) into
tensors plus JSON; ``restore`` checks that a checkpoint fits before it touches anything.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hardtrain import _dist
from hardtrain._redact import scrub
from hardtrain._resume_checks import (
    class_name,
    device_differences,
    model_differences,
    signature_differences,
)
from hardtrain.checkpoint import LoadedCheckpoint
from hardtrain.data import DataCursor, generators_of
from hardtrain.errors import CheckpointMismatchError
from hardtrain.state import capture_rng, flatten, restore_rng, unflatten

logger = logging.getLogger(__name__)

FORMAT = 1
STATE_KEY = "hardtrain"  # the trainer's part of a checkpoint's state
_NO_CONTEXT = contextlib.nullcontext()


class UserState:
    """The model, optimizers, schedulers, scaler, extra state, data position and step."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, Any],
        scaler: Any | None,
        extra_state: Mapping[str, Any],
        data: Iterable[Any],
    ) -> None:
        self.model = model
        self.optimizers = dict(optimizers)
        self.schedulers = dict(schedulers)
        self.scaler = scaler
        self.extra_state = dict(extra_state)
        self._data = data
        self.step = 0
        self.cursor = DataCursor(data, self._capture_rng, self._restore_rng)
        self._taking_batch: AbstractContextManager[None] = _NO_CONTEXT
        self._first_optimizer = next(iter(self.optimizers.values()))
        self._decoded: tuple[dict[str, Any], Decoded] | None = None  # by check, for restore

    @property
    def data(self) -> Any:
        return self._data

    # ------------------------------------------------------------------ the TrainState seam

    def skip_batches(self, batches: Sequence[tuple[int, int]]) -> None:
        self.cursor.skip.update(batches)

    def guard_batches(self, guard: AbstractContextManager[None] | None) -> None:
        self._taking_batch = _NO_CONTEXT if guard is None else guard

    # --------------------------------------------------------------------------- stepping

    def next_batch(self) -> tuple[Any, tuple[int, int]]:
        """The next batch and its (epoch, index in the epoch)."""
        with self._taking_batch:  # loader workers may be forked now: see shield_loader_workers
            batch = self.cursor.next_batch()
        epoch, index = self.cursor.next_id
        return batch, (epoch, index - 1)

    def lr(self) -> float | None:
        """The learning rate the next step uses: the first parameter group's."""
        lr = self._first_optimizer.param_groups[0].get("lr")
        return float(lr) if lr is not None else None

    def parameters(self) -> list[torch.Tensor]:
        """Every parameter, in the optimizers' order (clipping's order)."""
        return [p for opt in self.optimizers.values() for g in opt.param_groups
                for p in g["params"]]

    def release_data(self) -> None:
        """Drop the data's iterator (and its worker processes) now."""
        self.cursor.release()

    # ---------------------------------------------------------------------- checkpointing

    def capture(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Everything an exact resume needs, flattened into ``tensors`` plus JSON."""
        rank, world_size = _dist.rank_and_world_size()
        return {
            "format": FORMAT,
            "step": self.step,
            "rank": rank,
            "world_size": world_size,
            "signature": self.signature(),
            "model": flatten(unwrap(self.model).state_dict(), "model", tensors),
            "optimizers": {n: flatten(o.state_dict(), f"optimizers/{n}", tensors)
                           for n, o in self.optimizers.items()},
            "schedulers": {n: flatten(s.state_dict(), f"schedulers/{n}", tensors)
                           for n, s in self.schedulers.items()},
            "scaler": None if self.scaler is None
            else flatten(self.scaler.state_dict(), "scaler", tensors),
            "extra": {n: flatten(o.state_dict(), f"extra/{n}", tensors)
                      for n, o in self.extra_state.items()},
            "data": flatten(self.cursor.position(), "data", tensors),
            "rng": flatten(self._capture_rng(), "rng", tensors),
        }

    def signature(self) -> dict[str, Any]:
        """What must be the same for a checkpoint to fit this trainer."""
        return {
            "optimizers": {
                name: {"class": class_name(opt), "param_shapes": [
                    [list(p.shape) for p in group["params"]] for group in opt.param_groups
                ]} for name, opt in self.optimizers.items()
            },
            "schedulers": {name: class_name(s) for name, s in self.schedulers.items()},
            "scaler": None if self.scaler is None else class_name(self.scaler),
            "extra_state": sorted(self.extra_state),
            "data": self.cursor.kind,
            "data_generators": sorted(generators_of(self._data)),
        }

    def check(self, loaded: LoadedCheckpoint) -> None:
        """For ``CheckpointStore.load(check=...)``: decode the trainer's state of a
        checkpoint whose files verified, touching nothing. What raises here is damage
        (the state refers to tensors the file lacks, a field is missing or of the wrong
        type, an RNG state that cannot be set): the store rejects the step and falls back
        to the previous one. A checkpoint that does not fit this trainer passes: that is
        ``restore``'s CheckpointMismatchError."""
        saved = loaded.state.get(STATE_KEY)
        if isinstance(saved, dict) and saved.get("format") == FORMAT:
            self._decoded = (saved, decode(saved, loaded.tensors))

    def restore(self, saved: Any, tensors: Mapping[str, torch.Tensor], path: str) -> None:
        """Check that the checkpoint fits, then load it into the user's objects in place.
        Nothing is touched unless everything fits. Load it with ``check``: a damaged
        state is then the store's fallback, not an error here."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{path} was not written by HardenedTrainer (format {FORMAT}); load it with "
                "CheckpointStore, or use another run_dir."
            )
        checked, self._decoded = self._decoded, None
        state = checked[1] if checked is not None and checked[0] is saved else decode(
            saved, tensors)
        model = unwrap(self.model)
        differences = model_differences(model.state_dict(), state.model)
        differences += signature_differences(state.signature, self.signature())
        differences += device_differences(state.rng)
        if differences:
            raise CheckpointMismatchError(
                f"{path} does not fit this trainer: " + "; ".join(differences) + ". Nothing "
                "was loaded or overwritten. Resume with the model, optimizer and settings that "
                "wrote it, or start this configuration in a new run_dir."
            )
        model.load_state_dict(state.model)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state.optimizers[name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state.schedulers[name])
        if self.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state.extra[name])
        self.step = state.step
        with self._taking_batch:  # the data may fork loader workers
            warning = self.cursor.restore(state.data)
        if warning is not None:
            warning = scrub(warning)
            warnings.warn(warning, stacklevel=5)
            logger.warning("rank=%d %s", _dist.rank_and_world_size()[0], warning)
        self._restore_rng(state.rng)  # last: the data moved them

    def _capture_rng(self) -> dict[str, Any]:
        return capture_rng(generators_of(self._data))

    def _restore_rng(self, state: Mapping[str, Any]) -> None:
        restore_rng(state, generators_of(self._data))


@dataclass(frozen=True)
class Decoded:
    """A trainer checkpoint's state, unflattened and checked to hold together."""

    step: int
    signature: dict[str, Any]
    model: dict[str, Any]
    optimizers: dict[str, Any]
    schedulers: dict[str, Any]
    scaler: Any
    extra: dict[str, Any]
    data: dict[str, Any]
    rng: dict[str, Any]


_PARTS: dict[str, type] = {"step": int, "signature": dict, "model": dict, "optimizers": dict,
          "schedulers": dict, "extra": dict, "data": dict, "rng": dict}
_NDARRAY_KINDS = "biufcUSMm"  # no objects, no raw or structured bytes
_NDARRAY_BYTES = 1 << 20  # an array may take more than 64 bytes per element up to this


def decode(saved: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Decoded:
    """The trainer's state of a checkpoint (format 1), unflattened and checked before
    anything uses it: every tensor it refers to is in the file, every part ``restore``
    reads is there with its type, the parts agree with the checkpoint's own signature,
    and the RNG states can be set (on fresh generators). ValueError, TypeError or
    whatever the decoding raised says what does not hold together."""
    for part, kind in _PARTS.items():
        value: Any = saved.get(part)
        if not isinstance(value, kind) or isinstance(value, bool) or (
                isinstance(value, int) and value < 0):
            raise ValueError(f"the trainer state's {part!r} is {_short(value)}, not a "
                             f"{'count' if kind is int else kind.__name__}")
    _check_tree(saved, tensors)
    signature = saved["signature"]
    for part, key in (("optimizers", "optimizers"), ("schedulers", "schedulers"),
                      ("extra", "extra_state")):
        listed = signature.get(key)
        names = sorted(listed) if isinstance(listed, dict | list) else listed
        if names != sorted(saved[part]):
            raise ValueError(f"the trainer state holds {part} {sorted(saved[part])}, its "
                             f"signature lists {_short(names)}")
    if (saved.get("scaler") is None) != (signature.get("scaler") is None):
        raise ValueError("the trainer state's scaler and its signature disagree")
    features = saved.get("features", {})
    if not isinstance(features, dict) or not all(
            v is None or isinstance(v, dict) for v in features.values()):
        raise ValueError(f"the trainer state's features are {_short(features)}")
    state = Decoded(
        step=saved["step"], signature=signature,
        model=unflatten(saved["model"], tensors),
        optimizers={n: unflatten(v, tensors) for n, v in saved["optimizers"].items()},
        schedulers={n: unflatten(v, tensors) for n, v in saved["schedulers"].items()},
        scaler=unflatten(saved.get("scaler"), tensors),
        extra={n: unflatten(v, tensors) for n, v in saved["extra"].items()},
        data=unflatten(saved["data"], tensors), rng=unflatten(saved["rng"], tensors),
    )
    _check_position(state.data)
    _check_rng(state.rng, signature)
    return state


def _check_tree(tree: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tagged value of a flattened tree well formed, and every tensor it refers to
    in ``tensors``; no recursion (the parser capped the depth, not the width)."""
    missing: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if len(node) == 1 and (tag := next(iter(node))) in _TAGS:
            value = node[tag]
            if tag == "$tensor":
                if not isinstance(value, str) or value not in tensors:
                    missing.append(_short(value))
                continue
            _check_tag(tag, value)
            if tag in ("$ndarray", "$dtype", "$float"):
                continue
        stack.extend(node.values())
    if missing:
        raise ValueError(
            f"the state refers to {len(missing)} tensor(s) that the checkpoint's tensors do "
            f"not include: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")


_TAGS = ("$tensor", "$tuple", "$items", "$float", "$ndarray", "$dtype")


def _check_tag(tag: str, value: Any) -> None:
    if tag in ("$tuple", "$items") and not isinstance(value, list):
        raise ValueError(f"{tag} holds {_short(value)}, not a list")
    if tag == "$items" and not all(isinstance(i, list) and len(i) == 2 for i in value):
        raise ValueError(f"$items holds {_short(value)}, not [key, value] pairs")
    if tag == "$float" and not isinstance(value, str):
        raise ValueError(f"$float holds {_short(value)}")
    if tag == "$dtype" and not isinstance(getattr(torch, str(value), None), torch.dtype):
        raise ValueError(f"$dtype {_short(value)} is not a torch dtype")
    if tag == "$ndarray":
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
                and isinstance(value[1], list) and isinstance(value[2], list)):
            raise ValueError(f"$ndarray holds {_short(value)}, not [dtype, shape, values]")
        dtype = np.dtype(value[0])
        if dtype.kind not in _NDARRAY_KINDS or dtype.hasobject:
            raise ValueError(f"$ndarray of dtype {value[0]!r}: not a plain array")
        count = len(value[2])
        if dtype.itemsize > 64 and dtype.itemsize * count > _NDARRAY_BYTES:
            raise ValueError(f"$ndarray of {count} {value[0]!r}: {dtype.itemsize * count} "
                             f"bytes, over the {_NDARRAY_BYTES} that its JSON can hold")


def _check_position(position: Any) -> None:
    """The fields of the data position that ``DataCursor.restore`` reads."""
    counts = [position.get(k) for k in ("epoch", "batches_in_epoch")]
    skip = position.get("skip", [])
    if (not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            or not isinstance(position.get("started"), bool)
            or not isinstance(skip, list)
            or not all(isinstance(s, list) and len(s) == 2
                       and all(isinstance(x, int) for x in s) for s in skip)):
        raise ValueError(f"the data position is {_short(position)}")


def _check_rng(rng: Mapping[str, Any], signature: Mapping[str, Any]) -> None:
    """Set the RNG states on fresh generators: what would fail in ``restore_rng`` fails
    here, before anything is loaded."""
    random.Random().setstate(rng["python"])
    np.random.RandomState().set_state(rng["numpy"])
    torch.Generator().set_state(rng["torch"])
    generators = rng.get("generators", {})
    if not isinstance(generators, dict) or sorted(generators) != signature.get(
            "data_generators", sorted(generators)):
        raise ValueError("the RNG state's data generators and the signature disagree")
    for name, value in generators.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            raise ValueError(f"the RNG state of generator {name!r} is not a uint8 tensor")
    if not isinstance(rng.get("cuda", []), list):
        raise ValueError("the CUDA RNG states are not a list")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def features_state(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """The features' states in a trainer's checkpoint state, by feature name. Checkpoints
    from before the features had their own key kept the NaN rollback count at the top."""
    if "features" in saved:
        return saved["features"]  # type: ignore[no-any-return]
    return {"nan": {"num_rollbacks": saved.get("num_rollbacks", 0)}}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/FSDP-style ``.module`` and torch.compile's ``_orig_mod``."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            getattr(model, "module", None)
            if type(model).__name__ in ("DistributedDataParallel", "DataParallel") else None
        )
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
