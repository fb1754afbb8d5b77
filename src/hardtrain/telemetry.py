"""Events: one JSON line per incident or checkpoint in ``events.jsonl``, and one log line.

An event is named in the past tense (``checkpoint_saved``, ``checkpoint_rejected``) and
carries its figures as fields. Every event also goes to the ``hardtrain`` logger as one
``key=value`` line with the rank, and the newest are kept in ``EventLog.records``.
Fields are redacted first (``hardtrain._redact``): no secret reaches the file or the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

from hardtrain._dist import rank_and_world_size
from hardtrain._files import NotRegularFileError, open_regular
from hardtrain._redact import redact, scrub

logger = logging.getLogger(__name__)
_MAX_RECORDS = 10_000  # the newest events kept in memory; the file keeps them all


class EventSink(Protocol):
    def record(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """Record one event with its figures."""


class EventLog:
    """Appends events to ``path`` (a local JSONL file; ``None`` keeps them in memory only).

    The file is opened per event in append mode, so several ranks may share it and a crash
    loses at most the line being written. Recording never raises: if the file cannot be
    written, that is logged and the event still reaches the log and ``records``. That
    includes a symlink, FIFO or anything but a regular file at ``path``: never written
    through, each event a warning naming what is there.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.records: deque[dict[str, Any]] = deque(maxlen=_MAX_RECORDS)
        self._lock = threading.Lock()

    def record(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        rank = rank_and_world_size()[0]
        fields = redact(fields)  # a credential in a path or an error never reaches the file
        entry = {"time": time.time(), "event": event, "rank": rank, **fields}
        line = json.dumps(entry, default=str)
        with self._lock:
            self.records.append(entry)
            if self.path is not None:
                try:
                    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                    with _open_append(self.path) as f:
                        f.write(line + "\n")
                except OSError as e:  # a full disk must not turn an event into a new failure
                    logger.warning("could not append to %s: %s", self.path, scrub(str(e)))
        summary = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.log(level, "event=%s rank=%d %s", event, rank, summary)


class MetricsLog:
    """``metrics.jsonl``: one JSON line per step (``step``, ``loss``, ``lr``,
    ``step_time_s``), the loss as a full-precision float.

    A CUDA loss is copied to the host without blocking and written once that copy is done
    (checked without a device sync), so logging adds no host-device synchronisation per
    step; ``flush()`` writes everything, waiting for the device if needed. Lines reach the
    OS at least once a second and at every ``flush()``: the trainer flushes (durably)
    before each checkpoint, so a killed process loses only lines of steps after its last
    checkpoint, which the restart replays and writes again.

    A symlink, FIFO or anything but a regular file at ``path`` is ``NotRegularFileError``
    here, before the first step: never written through.
    """

    flush_every_s = 1.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            self._file = _open_append(self.path)
        except NotRegularFileError as e:
            raise NotRegularFileError(
                f"{e}; hardtrain never writes through a link (or into a FIFO or device) in "
                "a run directory: move it away (what it points to is untouched) and start "
                "again", e.kind, e.path) from None
        self._pending: deque[tuple[dict[str, Any], Any, Any]] = deque()
        self._flushed_at = time.monotonic()
        self._failing = False

    def write(self, step: int, loss: Any, lr: float | None, step_time_s: float) -> None:
        entry: dict[str, Any] = {"step": step, "loss": None, "lr": lr,
                                 "step_time_s": round(step_time_s, 6)}
        if hasattr(loss, "is_cuda") and loss.is_cuda:
            import torch  # only reached with CUDA tensors

            host = loss.detach().to("cpu", non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
            self._pending.append((entry, host, done))
            self._write_ready(block=False)
            return
        entry["loss"] = None if loss is None else float(loss)
        if self._pending:
            self._pending.append((entry, None, None))
        else:
            self._emit(entry)

    def flush(self, *, durable: bool = False) -> None:
        self._write_ready(block=True)
        self._flushed_at = time.monotonic()
        with self._storage_faults():
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()

    def _write_ready(self, *, block: bool) -> None:
        while self._pending:
            entry, host, done = self._pending[0]
            if done is not None:
                if not block and not done.query():
                    return
                done.synchronize()
                entry["loss"] = float(host)
            self._pending.popleft()
            self._emit(entry)

    def _emit(self, entry: dict[str, Any]) -> None:
        now = time.monotonic()
        with self._storage_faults():
            self._file.write(_metrics_line(entry))
            if now - self._flushed_at >= self.flush_every_s:
                self._flushed_at = now
                self._file.flush()

    @contextlib.contextmanager
    def _storage_faults(self) -> Iterator[None]:
        """A full disk or a failing mount does not stop training for its metrics: one
        warning per streak of failures. What stays in the file's buffer is written with
        the next flush; lines the buffer could not take may be lost (the metrics are a
        log, not the checkpoint)."""
        try:
            yield
        except OSError as e:
            if not self._failing:
                logger.warning("%s: writing metrics failed (%s: %s); training goes on, and "
                               "lines may be missing until the storage takes writes again",
                               self.path, type(e).__name__, e)
            self._failing = True
        else:
            self._failing = False


def _open_append(path: str) -> TextIO:
    """``path`` opened to append text: a regular file only, never through a symlink and
    never a FIFO or device (``NotRegularFileError`` naming what is there)."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode=0o666)  # as open()
    return os.fdopen(fd, "a", encoding="utf-8")


def _metrics_line(entry: dict[str, Any]) -> str:
    """``json.dumps(entry) + "\\n"`` for a metrics entry, in a fraction of its time (it runs
    every step): finite floats print as JSON numbers with ``repr``'s shortest round trip,
    anything else goes through ``json``."""
    parts = []
    for key, value in entry.items():
        if type(value) is float and math.isfinite(value):
            text = repr(value)
        elif type(value) is int:
            text = str(value)
        else:
            text = json.dumps(value)
        parts.append(f'"{key}": {text}')
    return "{" + ", ".join(parts) + "}\n"
