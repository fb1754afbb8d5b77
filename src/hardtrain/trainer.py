"""HardenedTrainer: the user's step inside a loop that checkpoints, resumes exactly and logs.

The loop is a composition of features (``hardtrain._features``), each joining it through
one protocol (``hardtrain._loop.protocol``); this module only validates, builds the
features a policy turns on (``_features``: the table), and runs ``fit``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from hardtrain._features.checkpointing import Checkpointing
from hardtrain._features.lease import RunDirLease
from hardtrain._features.logs import Logs, default_log_dir, is_remote
from hardtrain._features.metadata import RunMetadata
from hardtrain._features.nan import NanGuard
from hardtrain._features.preemption import Preemption
from hardtrain._loop.protocol import Feature, Recovery
from hardtrain._loop.run import Run
from hardtrain._loop.state import STATE_KEY, UserState
from hardtrain._loop.step import StepFn, Stepper
from hardtrain.checkpoint import CheckpointInfo, CheckpointStore
from hardtrain.checkpoint._policy import CheckpointPolicy
from hardtrain.determinism import seed_everything, set_deterministic
from hardtrain.metadata import MetadataPolicy
from hardtrain.numerics import NanPolicy
from hardtrain.preemption import PreemptionPolicy
from hardtrain.telemetry import EventLog

logger = logging.getLogger(__name__)
_P = TypeVar("_P")
_DEFAULT_CHECKPOINT = CheckpointPolicy()
_DEFAULT_PREEMPTION = PreemptionPolicy()
_DEFAULT_NAN = NanPolicy()
_DEFAULT_METADATA = MetadataPolicy()


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` did.

    step: completed optimizer steps (== max_steps when training finished).
    num_steps: steps run by this call (0 when the run had already finished).
    resumed_from: the checkpoint step this call started from, or None for a fresh start.
    final_loss: the last step's loss (None if this call ran no step).
    checkpoint: the last committed checkpoint, or None with ``checkpoint=None``.
    elapsed_s: wall-clock seconds spent in ``fit``.
    """

    step: int
    num_steps: int
    resumed_from: int | None
    final_loss: float | None
    checkpoint: CheckpointInfo | None
    elapsed_s: float


class HardenedTrainer:
    """Runs the user's step in a loop that checkpoints, resumes exactly, and logs.

    ``fit`` reads, in pseudocode (docs/architecture.md has the whole picture)::

        open: the logs, then each feature on (preemption: signal handlers; logs:
            metrics.jsonl; metadata: git, config, versions, hardware; checkpointing: the
            store)
        resume from the newest verified checkpoint once every feature accepted it
            (metadata warns or refuses when what breaks bit-exactness changed), or seed
        while step < max_steps:
            attempt: batch(es), loss = step_fn(batch), backward, clip or measure the
                gradient norm; loss and norm to the host (one sync) for the NaN guard
            vote: every feature's slots in one tensor, ONE all-reduce (MAX): bad step?
                stop (a preemption signal)? checkpoint due?
            apply (optimizer, scaler, scheduler; step += 1) or discard (bad anywhere)
            after the vote: a metrics line; the NaN guard counts the skip and, when bad
                steps persist, rolls back to the last good checkpoint leaving out the
                batches since (out of rollbacks: NonFiniteLossError)
            settle: stop (finish or abandon the save in flight, save this step if it fits
                before the deadline, raise ht.Preempted), else save if due (async)
        finish: the final checkpoint; close every feature in reverse order

    model: an ``nn.Module`` (DDP and ``torch.compile`` wrappers are saved unwrapped).
    optimizer: an optimizer, or ``{name: optimizer}`` for several.
    data: any iterable of batches; see ``hardtrain.data`` for how its position is saved.
    run_dir: a local folder or an fsspec URL; checkpoints go under ``run_dir/checkpoints``
        (a local path that is a file, or lies below one, is a ValueError here).
    scheduler: an LR scheduler, ``{name: scheduler}``, or None.
    scaler: a ``torch.amp.GradScaler``, or None.
    extra_state: ``{name: obj}``, each with ``state_dict()``/``load_state_dict()``.
    checkpoint: when to save (``CheckpointPolicy``); None for no checkpoints (and no resume).
    preemption: what a preemption signal does (``PreemptionPolicy``); None keeps the
        signals' default actions (SIGTERM kills the process at once).
    nan: what a non-finite or spiking step does (``NanPolicy``); None trains through it.
    metadata: run metadata in every checkpoint and the check on resume
        (``MetadataPolicy``); None for neither.
    seed: seeds every generator at a fresh start (``seed_everything``); None leaves them.
    deterministic: deterministic kernels (``set_deterministic``), on every start.
    config: the run's configuration (dict, dataclass, argparse Namespace, ...): recorded
        in every checkpoint's ``run.json``, secrets redacted, and compared on resume.
    log_dir: where ``metrics.jsonl`` and ``events.jsonl`` are written; by default
        ``run_dir`` when it is local, else ``./hardtrain-logs/<run_dir as a name>``, copied
        up to ``run_dir`` after every checkpoint.
    storage_options: fsspec options for a remote ``run_dir``.
    clock: seconds, monotonic; the wall-clock checkpoint trigger reads it (a seam for tests).

    The constructor only stores and checks; ``fit`` opens files, threads and groups and
    closes them when it returns or raises.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
        data: Iterable[Any],
        run_dir: str | os.PathLike[str],
        *,
        scheduler: Any | Mapping[str, Any] | None = None,
        scaler: Any | None = None,
        extra_state: Mapping[str, Any] | None = None,
        checkpoint: CheckpointPolicy | None = _DEFAULT_CHECKPOINT,
        preemption: PreemptionPolicy | None = _DEFAULT_PREEMPTION,
        nan: NanPolicy | None = _DEFAULT_NAN,
        metadata: MetadataPolicy | None = _DEFAULT_METADATA,
        seed: int | None = None,
        deterministic: bool = False,
        config: Any = None,
        log_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model={type(model).__name__}: expected a torch.nn.Module")
        self.model = model
        self.optimizers = _named(optimizer, "optimizer", torch.optim.Optimizer)
        if not self.optimizers:
            raise ValueError("optimizer={}: give at least one optimizer")
        self.schedulers = _named(scheduler, "scheduler", None)
        if not isinstance(data, Iterable):
            raise TypeError(f"data={type(data).__name__}: expected an iterable of batches")
        self.data = data
        self.run_dir = os.fspath(run_dir)
        _check_local_folder(self.run_dir)
        self.scaler = scaler
        self.extra_state = dict(extra_state or {})
        savable = [(f"scheduler[{n!r}]", o) for n, o in self.schedulers.items()]
        savable += [(f"extra_state[{n!r}]", o) for n, o in self.extra_state.items()]
        savable += [("scaler", scaler)] if scaler is not None else []
        for label, obj in savable:
            if not (callable(getattr(obj, "state_dict", None))
                    and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"{label}={type(obj).__name__}: needs state_dict() and "
                                "load_state_dict() to be saved and restored")
        self.checkpoint = _policy(checkpoint, CheckpointPolicy, "checkpoint")
        self.preemption = _policy(preemption, PreemptionPolicy, "preemption")
        self.nan = _policy(nan, NanPolicy, "nan")
        self.metadata = _policy(metadata, MetadataPolicy, "metadata")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32
        ):
            raise ValueError(f"seed={seed!r}: must be an int in [0, 2**32), or None")
        self.seed = seed
        self.deterministic = bool(deterministic)
        self.config = config
        self.log_dir = os.fspath(log_dir) if log_dir is not None else default_log_dir(self.run_dir)
        self.storage_options = dict(storage_options or {})
        self._clock = clock
        self._state = UserState(model, self.optimizers, self.schedulers, scaler,
                                self.extra_state, data)

    @property
    def step(self) -> int:
        """Completed optimizer steps (restored from the checkpoint on resume)."""
        return self._state.step

    def restore(self, step: int | None = None) -> CheckpointInfo:
        """Load the newest verified checkpoint in ``run_dir`` (or ``step``'s) into the
        model, optimizers, schedulers, scaler, extra state and data position, as ``fit``
        does when it resumes, and return it: for evaluating without training. Nothing is
        written and no signal handler is installed; the run metadata is not compared.

        Collective when distributed. Raises ``ht.NoCheckpointError`` when there is none,
        ``ht.CheckpointMismatchError`` when it does not fit these objects (nothing loaded).
        """
        store = CheckpointStore(self.run_dir, events=EventLog(None),
                                storage_options=self.storage_options)
        loaded = store.load(step=step, check=self._state.check)
        self._state.restore(loaded.state.get(STATE_KEY), loaded.tensors, loaded.path)
        self._state.release_data()  # the next fit resumes from the checkpoint anyway
        return CheckpointInfo(loaded.step, loaded.path, True)

    # ------------------------------------------------------------------------------ fit

    def fit(
        self,
        step_fn: StepFn,
        max_steps: int,
        *,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        manual: bool = False,
    ) -> FitResult:
        """Train until ``step == max_steps``, resuming from ``run_dir`` first.

        Collective when distributed: every rank must call it with the same arguments.

        step_fn(batch) -> loss: the forward pass. hardtrain does zero_grad, backward
            (through the scaler), clipping, the optimizer and scheduler steps.
        grad_accum_steps: batches per optimizer step; the loss is divided by it before
            backward and the logged loss is the mean over them (>= 1).
        max_grad_norm: clip the gradients' total norm to this (> 0), or None.
        manual: step_fn does its own zero_grad, backward, optimizer and scheduler steps
            (several optimizers, GANs) and returns the loss to log; one call is one step.
            Everything it touches is still saved if it was given to the trainer.

        Raises ``ht.Preempted`` (a ``SystemExit``) after a preemption signal, once the
        state is saved as far as the deadline allowed, and ``ht.NonFiniteLossError`` when
        bad steps persist through the NaN policy's rollbacks.
        """
        _check_fit_args(max_steps, grad_accum_steps, max_grad_norm, manual)
        started = time.perf_counter()
        if self.deterministic:
            set_deterministic()  # before the metadata records the flags
        state = self._state
        run = self._run()
        with run.open():
            resumed = run.resume()
            if resumed is None:
                self._start_fresh(run)
            if run.ctx.world_size > 2:
                _settle_ddp_buckets(self.model)
            first_step, loss = state.step, None
            if first_step >= max_steps:
                logger.info("rank=%d run already at step %d (max_steps=%d): nothing to train",
                            run.ctx.rank, first_step, max_steps)
                return self._result(run, first_step, resumed, None, started)
            run.settle(run.ballot.cast(None))  # a signal during start-up or resume
            stepper = Stepper(state, step_fn, accum=grad_accum_steps,
                              max_grad_norm=max_grad_norm, manual=manual, measure=run.measures)
            while state.step < max_steps:
                try:
                    report = stepper.attempt(max_steps)
                    verdict = run.ballot.cast(report)  # ONE all-reduce, every slot
                except Exception as error:
                    if run.recover(error) is Recovery.RELOAD:
                        run.reload(None)
                    else:  # RETRY: the batches it took are not taken again
                        stepper.discard()
                    continue
                if verdict.skip:
                    stepper.discard()
                else:
                    stepper.apply()
                run.after_vote(verdict, report)
                run.settle(verdict)  # stop, else save if due
                loss = report.loss
            run.finish()
            final_loss = None if loss is None else float(loss)
            run.ctx.events.record("training_finished", step=state.step,
                                  num_steps=state.step - first_step, final_loss=final_loss,
                                  **run.summary())
            return self._result(run, first_step, resumed, final_loss, started)

    def _run(self) -> Run:
        features = self._features()
        checkpoints = next((f for f in features if isinstance(f, Checkpointing)), None)
        return Run(features, self._state, checkpoints, run_dir=self.run_dir,
                   log_dir=self.log_dir, storage_options=self.storage_options, clock=self._clock)

    def _features(self) -> list[Feature]:
        """The table: the features the policies turn on, in the loop's fixed order."""
        features: list[Feature] = []
        if self.preemption is not None:
            features.append(Preemption(self.preemption))
        if self.checkpoint is not None or _logs_in_run_dir(self.run_dir, self.log_dir):
            # fit writes into run_dir: one job at a time (before the logs open)
            features.append(RunDirLease((self.checkpoint or _DEFAULT_CHECKPOINT).heartbeat_s))
        features.append(Logs(self.run_dir, self.log_dir, self.storage_options))
        if self.nan is not None:
            features.append(NanGuard(self.nan))
        if self.metadata is not None and self.checkpoint is not None:  # run.json needs one
            features.append(RunMetadata(self.metadata, self.config, self.seed))
        if self.checkpoint is not None:
            features.append(Checkpointing(self.checkpoint, self._clock))
        return features

    def _start_fresh(self, run: Run) -> None:
        if self.seed is not None and self._state.step == 0:  # not again on a second fit()
            seed_everything(self.seed)
        run.ctx.events.record("training_started", step=0, seed=self.seed,
                              world_size=run.ctx.world_size)

    def _result(self, run: Run, first_step: int, resumed: CheckpointInfo | None,
                final_loss: float | None, started: float) -> FitResult:
        step = self._state.step
        return FitResult(step, step - first_step, None if resumed is None else resumed.step,
                         final_loss, None if run.checkpoints is None else run.checkpoints.last,
                         time.perf_counter() - started)


# -------------------------------------------------------------------------------- helpers


def _policy(value: _P | None, kind: type[_P], name: str) -> _P | None:
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{name}={value!r}: expected ht.{kind.__name__} or None")
    return value


def _named(value: Any, what: str, kind: type | None) -> dict[str, Any]:
    if value is None:
        return {}
    items = dict(value) if isinstance(value, Mapping) else {what: value}
    for name, obj in items.items():
        if kind is not None and not isinstance(obj, kind):
            raise TypeError(f"{what}[{name!r}]={type(obj).__name__}: expected {kind.__name__}")
    return items


def _logs_in_run_dir(run_dir: str, log_dir: str) -> bool:
    """metrics.jsonl and events.jsonl are written into run_dir (or copied up to it)."""
    return is_remote(run_dir) or (
        os.path.abspath(log_dir) == os.path.abspath(default_log_dir(run_dir)))


def _check_local_folder(run_dir: str) -> None:
    """A local run_dir must be a folder, or not exist yet below folders."""
    if is_remote(run_dir):
        return
    path = os.path.abspath(run_dir.removeprefix("file://"))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        raise ValueError(f"run_dir={run_dir!r}: {path} is a file, not a folder. Pass a folder "
                         "for the checkpoints and logs (it is created if it does not exist).")


def _check_fit_args(max_steps: int, accum: int, max_grad_norm: float | None, manual: bool) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps={max_steps!r}: must be an int >= 0")
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ValueError(f"grad_accum_steps={accum!r}: must be an int >= 1")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, int | float)
                                          and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be > 0, or None")
    if manual and (accum != 1 or max_grad_norm is not None):
        raise ValueError("manual=True: step_fn does its own backward and optimizer steps, so "
                         "grad_accum_steps and max_grad_norm do not apply; do them in step_fn")


def _settle_ddp_buckets(model: torch.nn.Module) -> None:
    """Make DDP's one-time gradient-bucket rebuild (at a process's second forward) use
    parameter order instead of the order gradients became ready in its first backward.

    Without this, an uninterrupted run does its first step with DDP's initial buckets and
    the rest with rebuilt ones, while a restarted process does its first step after the
    resume with the initial buckets again. With 3 or more ranks the all-reduce sums each
    element in an order that depends on its place in the bucket, so the bits differ.
    With this, every process of both runs uses the same buckets from its first step on.
    Relies on DDP's ``reducer._push_all_rebuilt_params`` (DDP's own Join hook uses it);
    without it, nothing is done. Costs some overlap of communication with backward.
    """
    while not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = getattr(model, "_orig_mod", None)  # type: ignore[assignment]
        if not isinstance(model, torch.nn.Module):
            return
    push = getattr(getattr(model, "reducer", None), "_push_all_rebuilt_params", None)
    if callable(push):
        push()

