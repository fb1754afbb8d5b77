"""CheckpointStore: crash-safe, verified checkpoints in a local folder or any fsspec store.

The store is a facade over its parts: ``_write`` (save and commit), ``_load``, ``_verify``,
``_retention`` (listing, pruning) and ``_worker`` (the background thread), which share one
``Place`` (where the checkpoints lie, and which ones this run rejected).
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch

from hardtrain.checkpoint import _load, _resilience, _retention, _verify, _write
from hardtrain.checkpoint._place import Place
from hardtrain.checkpoint._policy import parse_duration
from hardtrain.checkpoint._reports import (
    CheckpointInfo,
    LoadedCheckpoint,
    SetAsideInfo,
    VerifyReport,
)
from hardtrain.checkpoint._resilience import RetryingStorage
from hardtrain.checkpoint._staging import StagingBuffer
from hardtrain.checkpoint._storage import LocalStorage, open_storage
from hardtrain.checkpoint._worker import SaveWorker
from hardtrain.telemetry import EventLog, EventSink


class CheckpointStore:
    """Crash-safe checkpoints under ``root`` (a local path or an fsspec URL).

    ``save``/``save_async`` write ``checkpoints/step-<8 digits>/`` and commit it by writing
    ``MANIFEST.json`` last; ``load`` verifies sizes and checksums and falls back to the
    previous checkpoint when the newest is damaged. Every call first finishes the save in
    flight and raises its error if it failed: a background failure is never swallowed.

    With torch.distributed initialised, ``save``, ``save_async`` and ``load`` are
    collective: every rank must call them in the same order, with the same step. Every
    rank writes its own files into the shared step folder; rank 0 commits once every rank
    reported success, and any failure is every rank's ``CheckpointWriteError``, raised by
    the same call on every rank. ``root`` must then be storage that every rank sees (a
    shared filesystem or a bucket).

    A failure of the storage itself is ``CheckpointStorageError`` (a ``CheckpointWriteError``):
    transient errors (timeouts, throttling, connection resets, 5xx) are first retried for
    up to ``retry_for``; a full disk or quota makes room by dropping the oldest committed
    checkpoints (never the newest that verifies) and tries again.

    keep_last: number of committed checkpoints to keep (>= 1), or None to keep all.
    events: where events go; by default ``<root>/events.jsonl`` for a local root, and
        the log only for a remote one.
    retry_for: how long one storage operation is retried on transient errors (a
        duration: seconds, "2min", a timedelta); 0 retries nothing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        events: EventSink | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry_for: timedelta | str | float = timedelta(minutes=2),
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last={keep_last!r}: must be an int >= 1, or None to keep all")
        retry_for_s = parse_duration(retry_for, field="retry_for").total_seconds()
        if retry_for_s < 0:
            raise ValueError(f"retry_for={retry_for!r}: must be >= 0 (0: no retries)")
        self.root = os.fspath(root)
        storage = open_storage(self.root, storage_options)
        if events is None:
            if isinstance(storage, LocalStorage):
                events = EventLog(os.path.join(storage.root, "events.jsonl"))
            else:
                events = EventLog(None)
        retrying = RetryingStorage(storage, retry_for_s, self._record)
        self._place = Place(self.root, retrying, events, keep_last)
        self._staging = StagingBuffer()
        self._worker = SaveWorker()

    def _record(self, event: str, **fields: Any) -> None:
        path = fields.pop("path", "")
        self._place.events.record(event, level=logging.WARNING,
                                  path=self._place.location(path), **fields)

    def preflight(self) -> None:
        """Check that checkpoints can be written here before training starts: the root
        is created if needed (a bucket never is) and a probe file is written, read back
        and deleted through the same path saves use. CheckpointStorageError naming the
        URL, the error and what to check. Not collective."""
        _resilience.preflight(self._place.storage, self.root)

    # keep_last and events live in the Place, so that setting them here reaches every part
    @property
    def keep_last(self) -> int | None:
        """Committed checkpoints kept after each save (>= 1), or None to keep all."""
        return self._place.keep_last

    @keep_last.setter
    def keep_last(self, keep_last: int | None) -> None:
        self._place.keep_last = keep_last

    @property
    def events(self) -> EventSink:
        """Where the store's events go."""
        return self._place.events

    @events.setter
    def events(self, events: EventSink) -> None:
        self._place.events = events

    # ----------------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        state: Mapping[str, Any] | None = None,
        *,
        files: Mapping[str, bytes] | None = None,
    ) -> CheckpointInfo:
        """Write and commit a checkpoint; return once it is durable.

        Collective when distributed. CPU tensors are written straight from their memory;
        GPU tensors and tensors sharing memory (tied weights) go through the staging
        buffer. Tied tensors load back as separate tensors with equal values.

        files: more files for the folder, ``{name: bytes}`` (``run.json``, a ``.patch``),
            written by this rank and verified like the rest; read them back with
            ``read_file``. No two ranks may give the same name.
        """
        self.wait()
        stage = _write.must_stage(tensors)
        job = _write.prepare(self._place, self._staging, step, tensors, state, files, stage=stage)
        return _write.persist(self._place, job)

    def save_async(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        state: Mapping[str, Any] | None = None,
        *,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        """Copy ``tensors`` into reused CPU staging buffers, then write and commit in a
        background thread. Returns once the copy is done: the caller may change the tensors.

        Waits for the previous save first. A background failure is raised by the next call
        on this store. Collective when distributed.
        """
        self.wait()
        job = _write.prepare(self._place, self._staging, step, tensors, state, files, stage=True)
        self._worker.start(functools.partial(_write.persist, self._place, job), job.cancel)

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the save in flight is committed; raise its error if it failed.

        timeout: seconds; when the save is still being written after that, TimeoutError
        (the save stays in flight). Interrupted (Ctrl-C, a signal handler that raises),
        the save stays in flight and the next call waits for it again: two saves never
        overlap.
        """
        return self._worker.wait(timeout)

    def abandon(self) -> CheckpointInfo | None:
        """Give up the save in flight: it stops at its next stage (before or after a file,
        before the commit), commits nothing, and earlier checkpoints stay as they were.
        Returns once its thread has stopped: the save's info if it committed anyway
        (it was past the point of no return), else None. Collective when distributed:
        the ranks' background threads agree, so every rank commits or none does.
        """
        return self._worker.abandon()

    @property
    def saving(self) -> bool:
        """True while a ``save_async`` is still being written (never blocks)."""
        return self._worker.busy

    def close(self) -> None:
        """Finish the save in flight and stop the background thread."""
        self._worker.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_aside_after(self, step: int, reason: str) -> list[int]:
        """Set aside (rename, never delete) every checkpoint newer than ``step``, so that
        loading finds ``step`` newest and those steps can be saved again: after a rollback,
        they belong to a timeline that was abandoned. Not collective: call it on one rank
        (rank 0), then let the ranks meet before loading. Returns the steps set aside."""
        self.wait()
        newer = [s for s in self._place.steps() if s > step]
        for later in newer:
            _retention.set_aside(self._place, later, reason)
        return newer

    # ---------------------------------------------------------------------- inspection

    def list(self, *, include_uncommitted: bool = False) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first, as their manifests describe them."""
        self.wait()
        return _retention.list_checkpoints(self._place, include_uncommitted)

    def list_set_aside(self) -> builtins.list[SetAsideInfo]:
        """Checkpoint folders set aside (damaged, or after a rollback): renamed
        ``step-N.rejected-...``, never loaded, never deleted by hardtrain; with the reason
        each one's note gives. Oldest step first."""
        self.wait()
        return _retention.list_set_aside(self._place)

    def verify(self, step: int) -> VerifyReport:
        """Check every file of ``step`` (all ranks) against its manifest."""
        self.wait()
        return _verify.verify(self._place, step)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint whose every file verifies, or None.

        Damaged ones on the way are rejected for the rest of this run, with a warning.
        """
        self.wait()
        return _retention.latest(self._place)

    def read_file(self, step: int, name: str) -> bytes:
        """One file of a committed checkpoint (``run.json``, ``git-diff.patch``, ...),
        verified against the manifest. Not collective.

        NoCheckpointError: ``step`` is not committed. FileNotFoundError: the manifest does
        not name ``name``. CheckpointCorruptError: the manifest or the file is damaged.
        """
        self.wait()
        return _verify.read_file(self._place, step, name)

    # ----------------------------------------------------------------------------- load

    def load(
        self,
        step: int | None = None,
        *,
        out: Mapping[str, torch.Tensor] | None = None,
        rank: int | None = None,
        check: Callable[[LoadedCheckpoint], None] | None = None,
    ) -> LoadedCheckpoint:
        """Load this rank's tensors and state, verified.

        step: None loads the newest checkpoint that verifies on every rank, falling back
            past damaged ones (each rejected with a warning and an event); NoCheckpointError
            when none is committed, CheckpointCorruptError when every one is damaged. A
            number loads that step or raises CheckpointCorruptError.
        out: tensors to fill in place (same names, shapes and dtypes as saved). The file
            is verified, and checked against them, before any of them is touched.
        rank: read another rank's files from a single process (inspection); not collective.
        check: called with each checkpoint whose files verified, before it is returned:
            what it raises is damage of that step (a warning, and the fallback as for a
            bad checksum), except CheckpointMismatchError, which is raised (it does not
            fit). For decoding what the state refers to, touching nothing.

        Collective when distributed and ``rank`` is None.
        """
        self.wait()
        return _load.load(self._place, step, out, rank, check)
