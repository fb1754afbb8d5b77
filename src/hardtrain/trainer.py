"""HardenedTrainer: the user's step inside a loop that checkpoints, resumes exactly and logs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch

from hardtrain import _dist
from hardtrain._redact import scrub
from hardtrain._resume_checks import (
    class_name,
    device_differences,
    model_differences,
    signature_differences,
)
from hardtrain._run import Run, default_log_dir
from hardtrain.checkpoint import CheckpointInfo
from hardtrain.checkpoint._policy import CheckpointPolicy
from hardtrain.data import DataCursor, generators_of
from hardtrain.determinism import seed_everything, set_deterministic
from hardtrain.errors import (
    ENVIRONMENT_RUNBOOK,
    CheckpointMismatchError,
    CheckpointWriteError,
    EnvironmentChangedError,
    NoCheckpointError,
    NonFiniteLossError,
    Preempted,
)
from hardtrain.metadata import (
    METADATA_FILE,
    EnvironmentChangedWarning,
    MetadataChange,
    MetadataPolicy,
    metadata_changes,
    metadata_files,
)
from hardtrain.metadata import capture as capture_metadata
from hardtrain.numerics import NanPolicy, NanWatch, StepHealth
from hardtrain.preemption import (
    PreemptionGuard,
    PreemptionPolicy,
    shield_loader_workers,
    signal_name,
)
from hardtrain.state import capture_rng, flatten, restore_rng, unflatten

logger = logging.getLogger(__name__)

_FORMAT = 1
_STATE_KEY = "hardtrain"
StepFn = Callable[[Any], Any]
_P = TypeVar("_P")
_DEFAULT_CHECKPOINT = CheckpointPolicy()
_DEFAULT_PREEMPTION = PreemptionPolicy()
_DEFAULT_NAN = NanPolicy()
_DEFAULT_METADATA = MetadataPolicy()
_MAX_BATCH_LOG = 1_000_000  # (step, batch id) pairs kept for a rollback's skip list
_EXIT_SHARE = 0.1  # of the preemption deadline, left for the process to exit
_NO_CONTEXT = contextlib.nullcontext()


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

    ``fit`` reads, in pseudocode::

        open the run: checkpoint store, metrics.jsonl, events.jsonl
        install the preemption signal handlers (they only set a flag)
        capture the run's metadata (git, config, versions, hardware; secrets redacted)
        resume from the newest verified checkpoint (or seed a fresh start), warning
            (or refusing) if what breaks bit-exactness changed since it was written
        while step < max_steps:
            batch = next batch (a new epoch when the data runs out; skip-listed ones dropped)
            loss = step_fn(batch); backward; clip (or measure the gradient norm)
            loss and norm to the host (one sync): is this step bad (NaN/Inf, a spike)?
            the ranks vote (one all-reduce): bad? stop? checkpoint due?
            if bad: skip it (no optimizer step); too many: roll back to the last good
                    checkpoint, leaving out the batches since; out of rollbacks: raise
            else: optimizer step; scheduler step; step += 1; one line in metrics.jsonl
            if stop: finish or abandon the save in flight, save this step if it fits
                     before the deadline, raise ht.Preempted (exit 128 + signal)
            if checkpoint due: save, with run.json (async: copy, then write in background)
        final checkpoint at max_steps; close; restore the signal handlers

    model: an ``nn.Module`` (DDP and ``torch.compile`` wrappers are saved unwrapped).
    optimizer: an optimizer, or ``{name: optimizer}`` for several.
    data: any iterable of batches; see ``hardtrain.data`` for how its position is saved.
    run_dir: a local folder or an fsspec URL; checkpoints go under ``run_dir/checkpoints``.
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
        self.step = 0
        self._num_rollbacks = 0  # NaN rollbacks in this run, saved with the checkpoints
        self._batch_log: deque[tuple[int, tuple[int, int]]] = deque(maxlen=_MAX_BATCH_LOG)
        self._taking_batch: contextlib.AbstractContextManager[None] = _NO_CONTEXT
        self._cursor = DataCursor(data, self._capture_rng, self._restore_rng)

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
        with self._open_run() as run:
            resumed_from = self._resume_or_start(run)
            if self.nan is not None:  # the rollback count comes from the checkpoint
                run.watch = NanWatch(self.nan, self._num_rollbacks)
            if run.world_size > 2:
                _settle_ddp_buckets(self.model)
            if self.step >= max_steps:
                logger.info("rank=%d run already at step %d (max_steps=%d): nothing to train",
                            run.rank, self.step, max_steps)
                return FitResult(self.step, 0, resumed_from, None, run.last_checkpoint,
                                 time.perf_counter() - started)
            first_step, loss = self.step, None
            if stop := self._vote(run, due=False)[1]:  # a signal during start-up or resume
                self._stop(run, stop)
            while self.step < max_steps:
                step_started, lr = time.perf_counter(), self._lr()  # the lr this step uses
                if manual:
                    loss, norm = step_fn(self._next_batch()), None
                else:
                    loss, norm = self._forward_backward(step_fn, grad_accum_steps, max_grad_norm)
                health = run.measure(loss, norm, self.scaler is not None)  # one sync, or none
                due = self._checkpoint_due(run, self.step + 1, self.step + 1 == max_steps)
                save, stop, bad = self._vote(run, due=due, bad=run.is_bad(health))
                if bad:  # on some rank: every rank skips it (manual: it already happened)
                    self._skip_step(run, health, lr, manual, max_grad_norm)
                else:
                    if not manual:
                        self._optimizer_step()
                    self.step += 1
                    run.record_step(self.step, loss if health is None else health.loss, lr,
                                    time.perf_counter() - step_started)
                    if run.watch is not None and health is not None:
                        run.watch.healthy(self.step, health, lr)
                if stop:
                    self._stop(run, stop)
                if save and not bad:
                    self._save(run)
            run.finish()
            if stop := self._vote(run, due=False)[1]:  # a signal during the final save
                self._stop(run, stop)
            final_loss = None if loss is None else float(loss)
            watch = run.watch
            run.events.record("training_finished", step=self.step,
                              num_steps=self.step - first_step, final_loss=final_loss,
                              **({} if watch is None else {
                                  "num_skipped": watch.num_skipped,
                                  "num_scaler_skipped": watch.num_scaler_skipped,
                                  "num_rollbacks": watch.num_rollbacks}))
            return FitResult(self.step, self.step - first_step, resumed_from, final_loss,
                             run.last_checkpoint, time.perf_counter() - started)

    def _forward_backward(
        self, step_fn: StepFn, accum: int, max_grad_norm: float | None
    ) -> tuple[Any, Any]:
        """Gradients over ``accum`` batches, clipped if asked. Returns the (mean) loss,
        detached, and the gradients' total norm (clipping's, or measured for the NaN
        check; None when neither needs it). No optimizer step yet: the ranks vote first."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accum):
            batch = self._next_batch()
            sync = micro == accum - 1 or not hasattr(self.model, "no_sync")
            with _NO_CONTEXT if sync else self.model.no_sync():  # type: ignore[operator]
                loss = step_fn(batch)
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"step_fn returned {type(loss).__name__}: expected the loss "
                                    "tensor (or use fit(..., manual=True))")
                scaled = loss / accum if accum > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(loss.detach())
        norm = None
        if max_grad_norm is not None:
            if self.scaler is not None:
                for optimizer in self.optimizers.values():
                    self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self._parameters(), max_grad_norm)
        elif self.nan is not None:  # grads of a GradScaler are scaled: only finiteness counts
            norm = _total_norm([p.grad for p in self._parameters() if p.grad is not None])
        return (losses[0] if accum == 1 else torch.stack(losses).mean()), norm

    def _optimizer_step(self) -> None:
        for optimizer in self.optimizers.values():
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        for scheduler in self.schedulers.values():
            scheduler.step()

    # ------------------------------------------------------------------------ the run

    @contextlib.contextmanager
    def _open_run(self) -> Iterator[Run]:
        guard = None
        self._batch_log.clear()
        with contextlib.ExitStack() as stack:
            if self.preemption is not None:
                guard = stack.enter_context(PreemptionGuard(self.preemption, clock=self._clock))
                self._taking_batch = stack.enter_context(
                    shield_loader_workers(self.data, self.preemption))
            run = Run(self, guard)
            try:
                yield run
            finally:
                self._taking_batch = _NO_CONTEXT
                run.close()

    def _resume_or_start(self, run: Run) -> int | None:
        """Load the newest verified checkpoint into the user's objects, or start fresh."""
        if self.deterministic:
            set_deterministic()
        now = None
        if self.metadata is not None and run.store is not None:  # after set_deterministic
            # rank 0 writes and compares it; the other ranks only send their host and device
            now = capture_metadata(self.config, seed=self.seed, repo=self.metadata.repo,
                                   nvml=None, group=run.group, full=run.rank == 0)
            run.metadata_files = metadata_files(now) if run.rank == 0 else {}
        loaded = None
        if run.store is not None:
            with contextlib.suppress(NoCheckpointError):
                loaded = run.store.load()
        if loaded is not None and now is not None:
            self._check_environment(run, loaded.step, loaded.path, now)
        if loaded is None:
            if self.seed is not None and self.step == 0:  # not again on a second fit()
                seed_everything(self.seed)
            run.events.record("training_started", step=0, seed=self.seed,
                              world_size=run.world_size)
            return None
        with self._taking_batch:  # the data may fork loader workers
            self._restore(loaded.state.get(_STATE_KEY), loaded.tensors, loaded.path)
        run.last_checkpoint = CheckpointInfo(loaded.step, loaded.path, True)
        run.saved_step = loaded.step
        logger.info("rank=%d resumed from %s (step %d, epoch %d, batch %d of the epoch)",
                    run.rank, scrub(loaded.path), self.step, self._cursor.epoch,
                    self._cursor.batches_in_epoch)
        run.events.record("resumed", from_step=loaded.step, path=loaded.path,
                          epoch=self._cursor.epoch)
        return loaded.step

    def _check_environment(self, run: Run, step: int, path: str, now: dict[str, Any]) -> None:
        """Collective when distributed. Compare this run's metadata with the checkpoint's
        run.json (rank 0 reads and compares for all); a change that breaks bit-exactness
        warns, or raises under ``on_change="refuse"``, before anything is loaded into the
        user's objects. A run.json that is missing or unreadable cannot vouch for the
        environment: an event, and under "refuse" an error."""
        assert self.metadata is not None and run.store is not None
        found: dict[str, Any] = {}
        if run.rank == 0:
            try:
                saved = json.loads(run.store.read_file(step, METADATA_FILE))
                found["changes"] = [c.as_json() for c in metadata_changes(saved, now)]
            except FileNotFoundError:
                found["missing"] = f"the checkpoint has no {METADATA_FILE}"
            except Exception as e:  # every rank must hear of it, not only rank 0
                found["missing"] = (f"its {METADATA_FILE} could not be read or compared "
                                    f"({type(e).__name__}: {e})")
        if run.group is not None:
            found = _dist.all_gather_json(found, run.group)[0]
        refuse = self.metadata.on_change == "refuse"
        if "missing" in found:
            if run.rank == 0:
                run.events.record("metadata_missing", level=logging.WARNING, step=step,
                                  path=path, reason=found["missing"], on_change=self.metadata
                                  .on_change)
            if refuse:
                raise EnvironmentChangedError(
                    f"{path}: {found['missing']}, so nothing shows the environment it was "
                    "written in, and MetadataPolicy(on_change='refuse') asked not to resume "
                    "then. Nothing was loaded into the model, optimizer or data, and the "
                    "checkpoints are untouched. Pass "
                    "MetadataPolicy(on_change='warn') to resume anyway.")
            return
        changes = [MetadataChange(**c) for c in found["changes"]]
        breaking = [c for c in changes if c.breaks_exactness]
        if changes and run.rank == 0:
            run.events.record(
                "environment_changed", level=logging.WARNING if breaking else logging.INFO,
                step=step, path=path, on_change=self.metadata.on_change,
                changes=[c.as_json() for c in breaking],
                other_changes=[c.as_json() for c in changes if not c.breaks_exactness],
            )
        if not breaking:
            return
        message = (f"{path} was written with another environment: "
                   + "; ".join(map(str, breaking)) + ".")
        if refuse:
            raise EnvironmentChangedError(
                f"{message} Resuming could not reproduce an uninterrupted run bit for bit, and "
                "MetadataPolicy(on_change='refuse') asked not to: nothing was loaded into the "
                "model, optimizer or data, and the checkpoints are untouched. Restore "
                "that environment, or pass MetadataPolicy(on_change='warn') to resume anyway.",
                breaking)
        if run.rank == 0:
            warnings.warn(
                f"{message} The resumed run may differ from an uninterrupted one; "
                f"`hardtrain metadata {scrub(self.run_dir)}` shows every difference. "
                f"See {ENVIRONMENT_RUNBOOK}", EnvironmentChangedWarning, stacklevel=4)

    def _checkpoint_due(self, run: Run, step: int, final: bool) -> bool:
        """This rank's view: is a checkpoint due once ``step`` is done? (Local.)"""
        policy = self.checkpoint
        if policy is None:
            return False
        run.collect_finished_save()
        if final or (policy.every_steps is not None and step % policy.every_steps == 0):
            return True
        every_s = run.every_s
        return every_s is not None and not run.saving and self._clock() - run.saved_at >= every_s

    def _vote(self, run: Run, *, due: bool, bad: bool = False) -> tuple[bool, int, bool]:
        """Collective when distributed: every rank must call this at every step. One
        all-reduce: (save, stop, bad) where save is True if due on any rank, stop the
        preemption signal's number if any rank received one (else 0), and bad True if
        the step is bad (non-finite, a spike) on any rank."""
        signum = run.guard.signum if run.guard is not None and run.guard.signum else 0
        save, stop, bad_anywhere = _dist.vote_max([int(due), signum, int(bad)], run.group)
        return bool(save), stop, bool(bad_anywhere)

    def _skip_step(self, run: Run, health: StepHealth | None, lr: float | None,
                   manual: bool, max_grad_norm: float | None) -> None:
        """Collective when distributed. The step is not applied (no optimizer, scheduler
        or scaler step; ``step`` stays); when bad steps persist, roll back."""
        assert run.watch is not None and self.nan is not None
        if not manual:
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None and max_grad_norm is not None:
                self.scaler.update()  # unscale_ ran: close the scaler's step without one
        seen = _dist.all_gather_json(_health_json(health, run.watch), run.group) \
            if run.group is not None else [_health_json(health, run.watch)]
        # A NaN loss on one rank makes every rank's gradients NaN through DDP's all-reduce:
        # the rank with the bad loss is where it began.
        ranks = [r for r, h in enumerate(seen) if h["reason"] is not None]
        first = next((r for r in ranks if seen[r]["reason"] == "loss"), ranks[0])
        failure = {"step": self.step, "reason": seen[first]["reason"], "first_rank": first,
                   "ranks": ranks,
                   "loss": seen[first]["loss"], "grad_norm": seen[first]["grad_norm"], "lr": lr}
        roll_back = run.watch.skipped(failure) or manual  # manual: the step already happened
        run.events.record("step_skipped", level=logging.WARNING, **failure,
                          consecutive=run.watch.consecutive, applied=manual)
        if roll_back:
            self._roll_back(run)

    def _roll_back(self, run: Run) -> None:
        """Collective when distributed. Load the newest checkpoint that healthy steps
        followed, set newer ones aside, and leave out the batches consumed since it."""
        assert run.watch is not None and self.nan is not None
        watch, failing_step = run.watch, self.step
        if watch.num_rollbacks >= self.nan.max_rollbacks:
            raise NonFiniteLossError(watch.diagnosis(run.world_size))
        run.collect_finished_save(block=True)
        if run.store is None:
            raise NonFiniteLossError(
                f"bad steps persisted at step {failing_step}, and with checkpoint=None there is "
                "nothing to roll back to.\n  " + watch.diagnosis(run.world_size))
        good = [i.step for i in run.store.list() if i.step < failing_step and i.problem is None]
        # rank 0's choice for all: another rank may list the folder while rank 0's save
        # thread is still pruning it
        target = _dist.all_gather_json(good[-1] if good else None, run.group)[0] \
            if run.group is not None else (good[-1] if good else None)
        if target is None:
            raise NonFiniteLossError(
                f"bad steps persisted at step {failing_step} and no checkpoint before it to "
                "roll back to (with keep_last=1 the one before the newest is gone).\n  "
                + watch.diagnosis(run.world_size))
        consumed = sorted({b for s, b in self._batch_log if s >= target})
        # The abandoned timeline's checkpoints are set aside (renamed, kept, never deleted)
        # so that their steps can be saved again. The target stays as it is: a crash
        # before the next checkpoint replays from it, meets the same bad steps and rolls
        # back the same way.
        if run.rank == 0:
            run.store.set_aside_after(target, f"rolled back from step {failing_step} to "
                                      f"{target}")
        _dist.vote_max([0], run.group)  # the ranks meet: those folders are gone for all
        loaded = run.store.load(step=target)
        self._cursor.release()  # its worker processes go now, not at garbage collection
        with self._taking_batch:  # the data may fork loader workers
            self._restore(loaded.state.get(_STATE_KEY), loaded.tensors, loaded.path)
        watch.rolled_back()
        self._num_rollbacks = watch.num_rollbacks
        if self.nan.skip_data:
            self._cursor.skip.update(consumed)
        run.last_checkpoint = CheckpointInfo(target, loaded.path, True)
        run.saved_step = target
        run.events.record(
            "rolled_back", level=logging.WARNING, from_step=failing_step, to_step=target,
            skipped_batches=[list(b) for b in consumed] if self.nan.skip_data else [],
            num_rollbacks=watch.num_rollbacks, max_rollbacks=self.nan.max_rollbacks,
        )

    def _save(self, run: Run, *, sync: bool = False) -> None:
        """Collective when distributed."""
        assert run.store is not None and self.checkpoint is not None
        started = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        state = {_STATE_KEY: self._capture(tensors)}
        run.flush_logs()
        run.collect_finished_save(block=True)  # its result, before save_async waits it away
        run.capture_s = time.perf_counter() - started
        if self.checkpoint.async_save and not sync:
            run.store.save_async(self.step, tensors, state, files=run.metadata_files)
            run.saving = True
        else:
            run.committed(run.store.save(self.step, tensors, state, files=run.metadata_files))
        run.saved_step = self.step

    def _stop(self, run: Run, signum: int) -> NoReturn:
        """Collective when distributed. Every rank stops at this step: the save in flight
        is finished (or abandoned when it would end too late), this step is saved if
        earlier saves say it fits before the deadline, then ht.Preempted."""
        assert run.guard is not None and self.preemption is not None
        deadline_s = self.preemption.deadline_s
        now = self._clock()
        elapsed = 0.0 if run.guard.received_at is None else now - run.guard.received_at
        mine: dict[str, Any] = {"signal": run.guard.signum, "elapsed": elapsed}
        seen = _dist.all_gather_json(mine, run.group) if run.group else [mine]
        signalled = [s["signal"] for s in seen]
        # the deadline runs from the earliest signal on any rank (clocks differ: elapsed)
        received_at = now - max(float(s["elapsed"]) for s in seen)
        deadline_at = received_at + deadline_s * (1 - _EXIT_SHARE)
        run.events.record("preemption_requested", level=logging.WARNING, step=self.step,
                          signal=signal_name(signum),
                          signalled_ranks=[r for r, s in enumerate(signalled) if s])
        if run.store is not None:
            run.finish_or_abandon(deadline_at - self._clock())
            # step 0: nothing to lose; in a NaN streak: the restart must meet it again
            streak = run.watch is not None and run.watch.consecutive > 0
            if run.saved_step != self.step and self.step > 0 and not streak:
                too_slow = run.save_too_slow(deadline_at - self._clock())
                if not _dist.vote_max([int(too_slow is not None)], run.group)[0]:
                    with contextlib.suppress(CheckpointWriteError):  # an event already
                        self._save(run, sync=True)
                else:
                    run.events.record(
                        "preemption_save_skipped", level=logging.WARNING, step=self.step,
                        reason=too_slow or "another rank's estimate said it would not fit",
                        deadline_s=deadline_s,
                    )
        last = run.last_checkpoint
        saved = last is not None and last.step == self.step
        code = self.preemption.exit_code_for(signum)
        run.events.record(
            "preempted", level=logging.WARNING, step=self.step, signal=signal_name(signum),
            exit_code=code, saved=saved, checkpoint_step=None if last is None else last.step,
            since_signal_s=round(self._clock() - received_at, 3), deadline_s=deadline_s,
            num_signals=run.guard.num_received,
        )
        where = ("this step is checkpointed" if saved else
                 f"the newest checkpoint is {last.path}" if last is not None else
                 "there is no checkpoint")
        message = scrub(f"stopped at step {self.step} on {signal_name(signum)}; {where}. "
                        f"Exit code {code}: start the same command again to continue.")
        logger.warning("rank=%d %s", run.rank, message)
        raise Preempted(code, message, step=self.step, signal=signal_name(signum),
                        checkpoint=last, saved=saved)

    # -------------------------------------------------------------------------- state

    def _capture(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Everything an exact resume needs, flattened into ``tensors`` plus JSON."""
        rank, world_size = _dist.rank_and_world_size()
        return {
            "format": _FORMAT,
            "step": self.step,
            "rank": rank,
            "world_size": world_size,
            "signature": self._signature(),
            "model": flatten(_unwrap(self.model).state_dict(), "model", tensors),
            "optimizers": {n: flatten(o.state_dict(), f"optimizers/{n}", tensors)
                           for n, o in self.optimizers.items()},
            "schedulers": {n: flatten(s.state_dict(), f"schedulers/{n}", tensors)
                           for n, s in self.schedulers.items()},
            "scaler": None if self.scaler is None
            else flatten(self.scaler.state_dict(), "scaler", tensors),
            "extra": {n: flatten(o.state_dict(), f"extra/{n}", tensors)
                      for n, o in self.extra_state.items()},
            "data": flatten(self._cursor.position(), "data", tensors),
            "rng": flatten(self._capture_rng(), "rng", tensors),
            "num_rollbacks": self._num_rollbacks,
        }

    def _signature(self) -> dict[str, Any]:
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
            "data": self._cursor.kind,
            "data_generators": sorted(generators_of(self.data)),
        }

    def _restore(self, saved: Any, tensors: Mapping[str, torch.Tensor], path: str) -> None:
        """Check that the checkpoint fits, then load it into the user's objects in place.
        Nothing is touched unless everything fits."""
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            raise CheckpointMismatchError(
                f"{path} was not written by HardenedTrainer (format {_FORMAT}); load it with "
                "CheckpointStore, or use another run_dir."
            )
        model = _unwrap(self.model)
        saved_model = unflatten(saved["model"], tensors)
        differences = model_differences(model.state_dict(), saved_model)
        differences += signature_differences(saved["signature"], self._signature())
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
        self._num_rollbacks = saved.get("num_rollbacks", 0)
        warning = self._cursor.restore(unflatten(saved["data"], tensors))
        if warning is not None:
            warning = scrub(warning)
            warnings.warn(warning, stacklevel=4)
            logger.warning("rank=%d %s", _dist.rank_and_world_size()[0], warning)
        self._restore_rng(unflatten(saved["rng"], tensors))  # last: the data moved them

    def _capture_rng(self) -> dict[str, Any]:
        return capture_rng(generators_of(self.data))

    def _restore_rng(self, state: Mapping[str, Any]) -> None:
        restore_rng(state, generators_of(self.data))

    def _next_batch(self) -> Any:
        with self._taking_batch:  # loader workers may be forked now: see shield_loader_workers
            batch = self._cursor.next_batch()
        if self.nan is not None:  # which batches a rollback would leave out
            epoch, index = self._cursor.next_id
            self._batch_log.append((self.step, (epoch, index - 1)))
        return batch

    def _lr(self) -> float | None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                lr = group.get("lr")
                return float(lr) if lr is not None else None
        return None

    def _parameters(self) -> list[torch.Tensor]:
        return [p for opt in self.optimizers.values() for g in opt.param_groups
                for p in g["params"]]


# -------------------------------------------------------------------------------- helpers


def _health_json(health: StepHealth | None, watch: NanWatch) -> dict[str, Any]:
    if health is None:
        return {"reason": None, "loss": None, "grad_norm": None}
    return {"reason": health.problem(watch.spike_limit()), "loss": health.loss,
            "grad_norm": health.grad_norm}


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The gradients' total 2-norm in few operations: one foreach norm and one norm of the
    norms when every gradient has the same device and dtype (torch's get_total_norm
    groups them first, several times the host cost on small steps), else get_total_norm."""
    if not grads:
        return None
    first = grads[0]
    if all(g.dtype == first.dtype and g.device == first.device for g in grads):
        norm: torch.Tensor = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return norm
    return torch.nn.utils.get_total_norm(grads)


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/FSDP-style ``.module`` and torch.compile's ``_orig_mod``."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            getattr(model, "module", None)
            if type(model).__name__ in ("DistributedDataParallel", "DataParallel") else None
        )
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


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

