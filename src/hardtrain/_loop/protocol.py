"""How a feature joins the training loop: the hooks, what they are given, what they return.

A feature (checkpointing, preemption, the NaN guard, metadata, logs, and later retry,
health, budget, a watchdog) is one object per ``fit``, built from its policy by the
trainer's table. The loop calls its hooks on every rank, in the table's fixed order, at
fixed points of the step lifecycle (docs/architecture.md draws it):

    open                 handlers, threads, files; may refuse to start (raise)
    check_resume         a checkpoint was found: refuse it (raise) before anything loads
    load_state_dict      a checkpoint was loaded (resume, or a reload): take its own state
    vote                 after each attempted step: this rank's values for its own slots
                         in the ballot. Local and O(1): no collective, no host-device sync
    after_vote           the verdict is known and the same on every rank; the step is
                         applied or discarded. Collectives are allowed here
    stop                 only the owner of the stop slot that won: describe the Stop
    on_stop              every other feature: its part before the exit (save, flush)
    exit                 the stop's owner, last: raise the exit (``ht.Preempted``, ...)
    state_dict, files    a checkpoint is being taken: its state, and files beside it
    on_error             a step raised: a Recovery, or None to let it propagate
    close                ``fit`` is ending (``exc`` is why, or None)
    summary              figures for the ``training_finished`` event

Features never call each other: what they share, they get from the ``Context`` the loop
hands them (the loop's services, no mutable bag) and from the ``Verdict``. Every hook has
a default that does nothing; the loop calls ``vote`` and ``after_vote`` only on features
that override them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, NoReturn, Protocol

from hardtrain import _dist

if TYPE_CHECKING:
    import torch

    from hardtrain.checkpoint import CheckpointInfo, LoadedCheckpoint
    from hardtrain.telemetry import EventSink


class Effect(enum.Enum):
    """What a slot's value does once the ranks have voted (MAX over ranks)."""

    SKIP = "skip"  # nonzero anywhere: this step is discarded on every rank
    STOP = "stop"  # nonzero anywhere: every rank stops after this step (the value: a code)
    SAVE = "save"  # nonzero anywhere: checkpoint this step (unless it is discarded)
    VALUE = "value"  # only read by its owner: a maximum (or, with minimum=True, a minimum)


@dataclass(frozen=True)
class Slot:
    """A named place in the ballot tensor, owned by one feature."""

    name: str
    effect: Effect
    minimum: bool = False  # reduce to the minimum over ranks (carried as -x in the MAX)


class StepReport(NamedTuple):
    """One attempted step on this rank, as the loop measured it (a tuple: it is made
    every step, and a NamedTuple costs a fraction of a frozen dataclass to make).

    step: completed steps before this attempt (the attempt would make it ``step + 1``).
    final: the attempt would complete the run (``step + 1 == max_steps``).
    loss: the step's loss as returned (a detached tensor, a number, or None: manual).
    loss_value, grad_norm: on the host (one sync for both) when a feature asked for them
        (``Feature.measures``), else None. grad_norm: clipping's, or measured.
    scaled: a GradScaler is in use (its own inf/NaN skips are not bad steps).
    lr: the learning rate this step used (the first param group's), or None.
    batches: the (epoch, index in epoch) of each batch the attempt took.
    manual: ``step_fn`` applied the step itself (it cannot be discarded).
    started: ``time.perf_counter()`` when the attempt began.
    """

    step: int
    final: bool
    loss: Any
    loss_value: float | None
    grad_norm: float | None
    scaled: bool
    lr: float | None
    batches: tuple[tuple[int, int], ...]
    manual: bool
    started: float


class Verdict:
    """The ballot after the all-reduce: the same on every rank.

    skip: discard this step (no optimizer step, ``step`` stays).
    save: a checkpoint of this step is due.
    stop: the name of the first STOP slot (in table order) voted nonzero, or None.
    ``verdict[name]``: a slot's reduced value (a minimum for ``minimum`` slots);
    ``values``: all of them by name.
    """

    __slots__ = ("_index", "_reduced", "save", "skip", "stop")

    def __init__(self, skip: bool, save: bool, stop: str | None, reduced: Sequence[int],
                 index: Mapping[str, int]) -> None:
        self.skip = skip
        self.save = save
        self.stop = stop
        self._reduced = reduced
        self._index = index  # slot name -> position in ``reduced``, shared by every verdict

    def __getitem__(self, slot: str) -> int:
        return self._reduced[self._index[slot]]

    @property
    def values(self) -> dict[str, int]:
        return {name: self._reduced[i] for name, i in self._index.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verdict) and (self.skip, self.save, self.stop, self.values) == (
            other.skip, other.save, other.stop, other.values)

    def __repr__(self) -> str:
        return (f"Verdict(skip={self.skip}, save={self.save}, stop={self.stop!r}, "
                f"values={self.values})")


@dataclass(frozen=True)
class Stop:
    """A stop every rank agreed on, as its owner described it.

    owner: the feature's name; reason: what it means ("preemption"); step: where.
    deadline_at: ``clock()`` by which the process must have exited, or None.
    skipped: the stop came with a discarded step (a save now would jump past it).
    detail: JSON-able figures for events.
    """

    owner: str
    reason: str
    step: int
    deadline_at: float | None
    skipped: bool
    detail: Mapping[str, Any]


# What a checkpoint holds, as the loop assembles it: (JSON state, tensors, extra files).
Snapshot = tuple[dict[str, Any], dict[str, "torch.Tensor"], dict[str, bytes]]


class Recovery(enum.Enum):
    """What the loop does with an error in a step, as a feature's ``on_error`` says."""

    RETRY = "retry"  # discard the step's gradients and attempt the step again
    RELOAD = "reload"  # load the newest verified checkpoint, then go on
    # To exit for a restart instead, on_error raises (e.g. SystemExit with a code).


class Checkpoints(Protocol):
    """The checkpointing feature's service to the loop and the other features."""

    @property
    def last(self) -> CheckpointInfo | None:
        """The newest committed (or loaded) checkpoint of this run."""

    def load(self, step: int | None = None,
             check: Callable[[LoadedCheckpoint], None] | None = None) -> LoadedCheckpoint:
        """Collective. The newest verified checkpoint (or ``step``'s); NoCheckpointError.
        ``check`` decodes it: what it raises is damage (see ``CheckpointStore.load``)."""

    def read_file(self, step: int, name: str) -> bytes:
        """One extra file of a committed checkpoint, verified (``run.json``)."""

    def committed_steps(self) -> list[int]:
        """Steps of the committed checkpoints that verify, oldest first."""

    def set_aside_after(self, step: int, reason: str) -> None:
        """Rename committed checkpoints newer than ``step`` out of the way (kept)."""

    def save(self, *, sync: bool = False) -> None:
        """Collective. Checkpoint the current step (async unless ``sync``)."""

    def drain(self) -> None:
        """Wait for the save in flight and take its result (raising its error)."""

    def save_final(self) -> None:
        """Collective. Checkpoint the current step unless it is saved; wait for it."""


class TrainState(Protocol):
    """The user's objects as the loop holds them: the step, the data, the batches."""

    step: int

    def skip_batches(self, batches: Sequence[tuple[int, int]]) -> None:
        """Leave these (epoch, index) batches out when the data reaches them again."""

    def guard_batches(self, guard: AbstractContextManager[None] | None) -> None:
        """Hold ``guard`` while a batch is taken (loader workers may fork then); None
        for no guard."""

    @property
    def data(self) -> Any:
        """The data as the user gave it."""


@dataclass(frozen=True)
class Context:
    """What the loop gives every hook: who this rank is, and the loop's services.

    group: the control group (``_dist.groups.get(_dist.CONTROL)``), None in one process;
        made at its first use, in a hook every rank runs (after the preemption handlers
        are in place), and the new one after a rebuild of the groups.
    checkpoints: None with ``checkpoint=None``.
    reload: Collective. Load ``step``'s checkpoint (the newest if None) into the user's
        objects and every feature; returns its info.
    snapshot: what a checkpoint of the current step holds (every feature's state and
        files with the user's objects); the checkpointing feature saves it.
    """

    rank: int
    world_size: int
    events: EventSink
    clock: Callable[[], float]
    run_dir: str
    log_dir: str
    storage_options: Mapping[str, Any]
    state: TrainState
    checkpoints: Checkpoints | None
    reload: Callable[[int | None], CheckpointInfo]
    snapshot: Callable[[], Snapshot]

    @property
    def group(self) -> Any:
        return _dist.groups.get(_dist.CONTROL)


class Feature:
    """Base of every feature: each hook does nothing until a feature overrides it.

    name: the feature's key (its state in a checkpoint is saved under it).
    slots: its places in the ballot, in the order ``vote`` returns their values.
    measures: it needs the loss and gradient norm on the host (``StepReport``); the
        loop then computes the norm and makes the one host-device sync of the step.
    """

    name: ClassVar[str]
    slots: ClassVar[tuple[Slot, ...]] = ()
    measures: ClassVar[bool] = False

    def open(self, ctx: Context) -> None:
        """Start: install handlers, open files and threads, check what must hold."""

    def check_resume(self, ctx: Context, checkpoint: CheckpointInfo) -> None:
        """Collective. Raise to refuse ``checkpoint`` before anything is loaded from it."""

    def load_state_dict(self, state: Mapping[str, Any] | None,
                        checkpoint: CheckpointInfo) -> None:
        """Take this feature's state from a loaded checkpoint (None: it has none)."""

    def state_dict(self) -> dict[str, Any] | None:
        """This feature's state for the checkpoint being taken (JSON), or None; also the
        moment to make durable what must be (the metrics lines up to this step)."""
        return None

    def files(self) -> Mapping[str, bytes]:
        """Extra files for the checkpoint being taken, ``{name: bytes}``."""
        return {}

    def vote(self, report: StepReport | None) -> Sequence[int]:
        """This rank's values for ``slots`` (report None: the vote before the first step
        or after the final save). Local and O(1): no collective, no host sync."""
        return ()

    def after_vote(self, ctx: Context, verdict: Verdict, report: StepReport) -> None:
        """Collective allowed. The step was applied (``not verdict.skip``) or discarded."""

    def stop(self, ctx: Context, verdict: Verdict) -> Stop:
        """Collective. Only for a feature with a STOP slot, when its slot won."""
        raise NotImplementedError(f"{self.name} has no stop slot")

    def on_stop(self, ctx: Context, stop: Stop) -> None:
        """Collective. Every rank is stopping for another feature's ``stop``: do what
        must be done before the process exits."""

    def exit(self, ctx: Context, stop: Stop) -> NoReturn:
        """Collective. This feature's stop, after every other feature's ``on_stop``:
        raise the exit."""
        raise NotImplementedError(f"{self.name} has no stop slot")

    def on_error(self, ctx: Context, error: BaseException) -> Recovery | None:
        """A step raised ``error`` on this rank: how to recover, or None."""
        return None

    def close(self, ctx: Context, error: BaseException | None) -> None:
        """``fit`` is ending, normally (None) or because of ``error``."""

    def summary(self) -> Mapping[str, Any]:
        """Figures for the ``training_finished`` event."""
        return {}


def overrides(feature: Feature, hook: str) -> bool:
    """Whether ``feature`` has its own ``hook`` (the loop skips the default no-ops)."""
    return getattr(type(feature), hook) is not getattr(Feature, hook)
