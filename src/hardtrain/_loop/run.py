"""What one ``fit`` holds open: the features in their fixed order, the context they
share, the ballot; and the loop's own phases that involve them all (resume, reload, the
stop, the end).

The order of the features is the trainer's table order: hooks are called in it (``close``
in reverse), and a stop's owner is called last in ``on_stop``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import torch

from hardtrain import _dist
from hardtrain._loop.ballot import Ballot
from hardtrain._loop.protocol import (
    Checkpoints,
    Context,
    Feature,
    Recovery,
    Snapshot,
    StepReport,
    Verdict,
    overrides,
)
from hardtrain._loop.state import STATE_KEY, UserState, features_state
from hardtrain._redact import scrub
from hardtrain.checkpoint import CheckpointInfo, LoadedCheckpoint
from hardtrain.errors import NoCheckpointError
from hardtrain.telemetry import EventLog

logger = logging.getLogger(__name__)


class Run:
    """The features of one ``fit`` and the context they share; opened by ``open``."""

    def __init__(self, features: Sequence[Feature], state: UserState,
                 checkpoints: Checkpoints | None, *, run_dir: str, log_dir: str,
                 storage_options: Mapping[str, Any], clock: Callable[[], float]) -> None:
        self.features = tuple(features)
        self.state = state
        self.checkpoints = checkpoints
        self._settings = (run_dir, log_dir, storage_options, clock)
        self._after_vote = [f for f in self.features if overrides(f, "after_vote")]
        self._on_error = [f for f in self.features if overrides(f, "on_error")]
        self._stop_owners = {s.name: f for f in self.features for s in f.slots}
        self.measures = any(f.measures for f in self.features)
        self._carried: dict[str, Any] = {}  # loaded states of features this run has not

    @contextlib.contextmanager
    def open(self) -> Iterator[Run]:
        """Open the events log and every feature (the preemption handlers first), then lay
        out the ballot on the control group; close them in reverse."""
        run_dir, log_dir, storage_options, clock = self._settings
        rank, world_size = _dist.rank_and_world_size()
        os.makedirs(log_dir, exist_ok=True)
        self.ctx = Context(
            rank=rank, world_size=world_size, clock=clock,
            events=EventLog(os.path.join(log_dir, "events.jsonl")),
            run_dir=run_dir, log_dir=log_dir, storage_options=storage_options,
            state=self.state, checkpoints=self.checkpoints, reload=self.reload,
            snapshot=self.snapshot,
        )
        opened: list[Feature] = []
        error: BaseException | None = None
        try:
            for feature in self.features:
                feature.open(self.ctx)
                opened.append(feature)
            self.ballot = Ballot(self.features, self.ctx.group)
            yield self
        except BaseException as e:
            error = e
            raise
        finally:
            with contextlib.ExitStack() as closing:  # every one closes; the first error wins
                for feature in opened:  # the stack closes them in reverse
                    closing.callback(feature.close, self.ctx, error)
                if self.checkpoints is not None:
                    # the data's iterator goes first: the next fit resumes from the checkpoint
                    closing.callback(self.state.release_data)

    # ---------------------------------------------------------------------------- resume

    def resume(self) -> CheckpointInfo | None:
        """Collective when distributed. Load the newest verified checkpoint into the
        user's objects and every feature, once every feature accepted it; None when
        there is none (or no checkpointing)."""
        if self.checkpoints is None:
            return None
        try:
            loaded = self.checkpoints.load(check=self.state.check)  # damage: the previous
        except NoCheckpointError:
            return None
        info = CheckpointInfo(loaded.step, loaded.path, True)
        for feature in self.features:
            feature.check_resume(self.ctx, info)
        self._restore(loaded, info)
        cursor = self.state.cursor
        logger.info("rank=%d resumed from %s (step %d, epoch %d, batch %d of the epoch)",
                    self.ctx.rank, scrub(loaded.path), self.state.step, cursor.epoch,
                    cursor.batches_in_epoch)
        self.ctx.events.record("resumed", from_step=loaded.step, path=loaded.path,
                               epoch=cursor.epoch)
        return info

    def reload(self, step: int | None) -> CheckpointInfo:
        """Collective when distributed. Load ``step``'s checkpoint (the newest verified
        if None) into the user's objects and every feature: a rollback, a recovery."""
        assert self.checkpoints is not None, "reload needs checkpointing"
        self.checkpoints.drain()  # the save in flight commits (or fails) first
        loaded = self.checkpoints.load(step, check=self.state.check)
        self.state.release_data()  # its worker processes go now, not at garbage collection
        info = CheckpointInfo(loaded.step, loaded.path, True)
        self._restore(loaded, info)
        return info

    def _restore(self, loaded: LoadedCheckpoint, info: CheckpointInfo) -> None:
        saved: Any = loaded.state.get(STATE_KEY)
        self.state.restore(saved, loaded.tensors, loaded.path)  # checks before it loads
        states = features_state(saved)
        names = {f.name for f in self.features}
        self._carried = {k: v for k, v in states.items() if k not in names}  # saved again
        for feature in self.features:
            feature.load_state_dict(states.get(feature.name), info)

    def snapshot(self) -> Snapshot:
        """What a checkpoint of the current step holds: the user's objects, every
        feature's state (under ``features``), and the features' extra files."""
        tensors: dict[str, torch.Tensor] = {}
        state = self.state.capture(tensors)
        state["features"] = {**self._carried, **{f.name: s for f in self.features
                                                 if (s := f.state_dict()) is not None}}
        files: dict[str, bytes] = {}
        for feature in self.features:
            files.update(feature.files())
        return {STATE_KEY: state}, tensors, files

    # ----------------------------------------------------------------------- each step

    def after_vote(self, verdict: Verdict, report: StepReport) -> None:
        for feature in self._after_vote:
            feature.after_vote(self.ctx, verdict, report)

    def settle(self, verdict: Verdict) -> None:
        """Collective when distributed. The verdict's last effects: stop, else save."""
        if verdict.stop is not None:
            self.stop(verdict)
        if verdict.save and not verdict.skip and self.checkpoints is not None:
            self.checkpoints.save()

    def stop(self, verdict: Verdict) -> NoReturn:
        """Collective when distributed. The winning slot's owner describes the stop,
        every other feature does its part, then the owner raises the exit."""
        assert verdict.stop is not None
        owner = self._stop_owners[verdict.stop]
        stop = owner.stop(self.ctx, verdict)
        for feature in self.features:
            if feature is not owner:
                feature.on_stop(self.ctx, stop)
        owner.exit(self.ctx, stop)

    def recover(self, error: Exception) -> Recovery:
        """A step raised ``error``: the first feature's answer; none re-raises it."""
        for feature in self._on_error:
            recovery = feature.on_error(self.ctx, error)
            if recovery is not None:
                self.ctx.events.record("step_failed", level=logging.WARNING,
                                       step=self.state.step, recovery=recovery.value,
                                       by=feature.name, error=f"{type(error).__name__}: {error}")
                return recovery
        raise error

    def finish(self) -> None:
        """Collective when distributed. The final checkpoint, then a stop that came
        during it."""
        if self.checkpoints is not None:
            self.checkpoints.save_final()
        self.settle(self.ballot.cast(None))

    def summary(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        for feature in self.features:
            figures.update(feature.summary())
        return figures
