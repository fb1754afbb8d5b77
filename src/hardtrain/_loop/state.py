"""The user's objects as the loop holds them, and their capture into a checkpoint and back.

``UserState`` owns the model, optimizers, schedulers, scaler, extra state, the data
cursor and the step count. ``capture`` flattens all of it (and the RNG streams) into
tensors plus JSON; ``restore`` checks that a checkpoint fits before it touches anything.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from hardtrain import _dist
from hardtrain._redact import scrub
from hardtrain._resume_checks import (
    class_name,
    device_differences,
    model_differences,
    signature_differences,
)
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

    def restore(self, saved: Any, tensors: Mapping[str, torch.Tensor], path: str) -> None:
        """Check that the checkpoint fits, then load it into the user's objects in place.
        Nothing is touched unless everything fits."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{path} was not written by HardenedTrainer (format {FORMAT}); load it with "
                "CheckpointStore, or use another run_dir."
            )
        model = unwrap(self.model)
        saved_model = unflatten(saved["model"], tensors)
        differences = model_differences(model.state_dict(), saved_model)
        differences += signature_differences(saved["signature"], self.signature())
        differences += device_differences(saved["rng"])
        if differences:
            raise CheckpointMismatchError(
                f"{path} does not fit this trainer: " + "; ".join(differences) + ". Nothing "
                "was loaded or overwritten. Resume with the model, optimizer and settings that "
                "wrote it, or start this configuration in a new run_dir."
            )
        model.load_state_dict(saved_model)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(unflatten(saved["optimizers"][name], tensors))
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(unflatten(saved["schedulers"][name], tensors))
        if self.scaler is not None:
            self.scaler.load_state_dict(unflatten(saved["scaler"], tensors))
        for name, obj in self.extra_state.items():
            obj.load_state_dict(unflatten(saved["extra"][name], tensors))
        self.step = saved["step"]
        with self._taking_batch:  # the data may fork loader workers
            warning = self.cursor.restore(unflatten(saved["data"], tensors))
        if warning is not None:
            warning = scrub(warning)
            warnings.warn(warning, stacklevel=5)
            logger.warning("rank=%d %s", _dist.rank_and_world_size()[0], warning)
        self._restore_rng(unflatten(saved["rng"], tensors))  # last: the data moved them

    def _capture_rng(self) -> dict[str, Any]:
        return capture_rng(generators_of(self._data))

    def _restore_rng(self, state: Mapping[str, Any]) -> None:
        restore_rng(state, generators_of(self._data))


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
