"""What one ``HardenedTrainer.fit`` call holds open: the checkpoint store, the logs, the
vote group, the preemption guard, the NaN watch, and the bookkeeping of saves."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import torch

from hardtrain import _dist
from hardtrain._redact import scrub
from hardtrain.checkpoint import CheckpointInfo, CheckpointStore
from hardtrain.errors import CheckpointWriteError
from hardtrain.numerics import NanWatch, StepHealth
from hardtrain.preemption import PreemptionGuard
from hardtrain.telemetry import EventLog, MetricsLog

if TYPE_CHECKING:
    from hardtrain.trainer import HardenedTrainer


@dataclass
class Run:
    """What one ``fit`` call holds open: store, logs, vote group, save bookkeeping."""

    trainer: HardenedTrainer
    guard: PreemptionGuard | None = None
    store: CheckpointStore | None = None
    events: EventLog = field(init=False)
    metrics: MetricsLog | None = None
    group: Any = None
    rank: int = 0
    world_size: int = 1
    saving: bool = False
    saved_at: float = 0.0  # clock() when the last save finished (or the run started)
    saved_step: int | None = None
    last_checkpoint: CheckpointInfo | None = None
    every_s: float | None = None
    watch: NanWatch | None = None
    capture_s: float = 0.0  # the last save's capture time (before the store's part)
    save_costs: deque[float] = field(default_factory=lambda: deque(maxlen=4))
    metadata_files: dict[str, bytes] = field(default_factory=dict)  # run.json, ... (rank 0)

    def __post_init__(self) -> None:
        trainer = self.trainer
        self.rank, self.world_size = _dist.rank_and_world_size()
        os.makedirs(trainer.log_dir, exist_ok=True)
        self.events = EventLog(os.path.join(trainer.log_dir, "events.jsonl"))
        if self.guard is not None and not self.guard.armed:
            self.events.record("preemption_unarmed", level=logging.WARNING,
                               reason="fit is not running in the main thread, where signal "
                               "handlers must be installed; signals keep their default action")
        self.upload_logs = is_remote(trainer.run_dir) and self.rank == 0
        if self.upload_logs:
            self.upload_logs = self._download_logs()
        if self.world_size > 1:
            self.group = _dist.new_cpu_group()
        policy = trainer.checkpoint
        if policy is not None:
            self.every_s = policy.every_s
            self.store = CheckpointStore(trainer.run_dir, keep_last=policy.keep_last,
                                         events=self.events,
                                         storage_options=trainer.storage_options)
        if self.rank == 0:
            self.metrics = MetricsLog(os.path.join(trainer.log_dir, "metrics.jsonl"))
        self.saved_at = trainer._clock()

    def measure(self, loss: Any, norm: Any, scaled: bool) -> StepHealth | None:
        """The step's loss and gradient norm on the host: the one host-device sync the
        NaN check costs. None without a NaN policy (or a manual step returning None)."""
        if self.watch is None or loss is None:
            return None
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        parts = [loss.detach().float().reshape(())]
        if norm is not None:
            parts.append(norm.detach().float().reshape(()).to(parts[0].device))
        values = torch.stack(parts).tolist()
        grad_norm = values[1] if len(values) > 1 else None
        scaler_skipped = scaled and grad_norm is not None and not math.isfinite(grad_norm)
        return StepHealth(values[0], grad_norm, scaler_skipped)

    def is_bad(self, health: StepHealth | None) -> bool:
        return (health is not None and self.watch is not None
                and health.problem(self.watch.spike_limit()) is not None)

    def record_step(self, step: int, loss: Any, lr: float | None, step_time_s: float) -> None:
        if self.metrics is not None:
            self.metrics.write(step, loss, lr, step_time_s)

    def collect_finished_save(self, *, block: bool = False) -> None:
        """If the background save has finished (or ``block``: once it has), take its
        result, raising its error."""
        if self.saving and self.store is not None and (block or not self.store.saving):
            self.saving = False
            info = self.store.wait()
            if info is not None:
                self.committed(info)

    def committed(self, info: CheckpointInfo) -> None:
        self.last_checkpoint = info
        self.saved_at = self.trainer._clock()
        self.save_costs.append(self.capture_s + (info.blocking_s or 0) + (info.persist_s or 0))
        if self.upload_logs:
            self._upload_logs()

    def finish_or_abandon(self, budget_s: float) -> None:
        """At a preemption: wait up to ``budget_s`` for the save in flight, then give it
        up; the previous checkpoint stays valid. Collective when distributed (the ranks'
        save threads agree on commit or not)."""
        if not self.saving or self.store is None:
            return
        self.saving = False
        try:
            info = self.store.wait(timeout=max(budget_s, 0.0))
        except (TimeoutError, concurrent.futures.TimeoutError):  # not the same before 3.11
            info = self.store.abandon()
        except CheckpointWriteError:
            info = None  # recorded as checkpoint_save_failed
        if info is not None:
            self.committed(info)
        else:  # abandoned or failed: the saved step is the last committed one
            self.saved_step = None if self.last_checkpoint is None else self.last_checkpoint.step

    def save_too_slow(self, remaining_s: float) -> str | None:
        """Why a save now would not fit in ``remaining_s``, judged by the slowest of the
        last saves; None when it fits (or nothing was measured yet: then it is tried)."""
        if remaining_s <= 0:
            return f"the deadline has passed ({-remaining_s:.1f} s ago)"
        if self.save_costs and max(self.save_costs) > remaining_s:
            return (f"earlier saves took up to {max(self.save_costs):.1f} s and {remaining_s:.1f} "
                    "s are left before the deadline")
        return None

    def flush_logs(self) -> None:
        """Before a checkpoint: every line up to this step is durable, so a restart that
        resumes here finds the log complete up to it."""
        if self.metrics is not None:
            self.metrics.flush(durable=True)

    def finish(self) -> None:
        """The final checkpoint (if the last step was not saved) and waiting for it."""
        if self.store is not None:
            if self.saved_step != self.trainer.step:
                self.trainer._save(self)
            self.saving = False
            info = self.store.wait()
            if info is not None:
                self.committed(info)

    def close(self) -> None:
        """Finish the save in flight (a committed checkpoint beats a fast exit) and close.
        The data's iterator goes too: the next ``fit`` resumes from the checkpoint."""
        try:
            if self.store is not None:
                self.trainer._cursor.release()
                self.store.close()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self.upload_logs:
                self._upload_logs()

    def _log_files(self) -> list[tuple[str, str]]:
        trainer = self.trainer
        return [(os.path.join(trainer.log_dir, name), f"{trainer.run_dir.rstrip('/')}/{name}")
                for name in ("metrics.jsonl", "events.jsonl")]

    def _upload_logs(self) -> None:
        """Copy the local logs up to a remote run_dir; a failure is an event, never fatal."""
        try:
            fs, _ = fsspec.core.url_to_fs(self.trainer.run_dir, **self.trainer.storage_options)
            for local, remote in self._log_files():
                if os.path.exists(local):
                    fs.put_file(local, remote)
        except Exception as e:
            self.events.record("logs_upload_failed", level=logging.WARNING,
                               error=f"{type(e).__name__}: {e}")

    def _download_logs(self) -> bool:
        """A restart on a new machine continues the logs already in the remote run_dir.
        If they cannot be fetched, the local logs are not copied up (that would replace
        the remote history with a shorter one): an event says so, and False."""
        try:
            fs, _ = fsspec.core.url_to_fs(self.trainer.run_dir, **self.trainer.storage_options)
            for local, remote in self._log_files():
                if not os.path.exists(local) and fs.exists(remote):
                    fs.get_file(remote, local)
        except Exception as e:
            self.events.record(
                "logs_download_failed", level=logging.WARNING, error=f"{type(e).__name__}: {e}",
                note=f"logs stay in {self.trainer.log_dir} and are not copied up this run",
            )
            return False
        return True


def is_remote(run_dir: str) -> bool:
    protocol = fsspec.core.split_protocol(run_dir)[0]
    return protocol not in (None, "file", "local")


def default_log_dir(run_dir: str) -> str:
    if not is_remote(run_dir):
        return fsspec.core.strip_protocol(run_dir) if run_dir.startswith("file://") else run_dir
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", scrub(run_dir)).strip("_")  # no credentials
    return os.path.join("hardtrain-logs", name)
