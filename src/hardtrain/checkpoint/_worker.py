"""The background thread of ``save_async``: one save in flight at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from hardtrain.checkpoint._reports import CheckpointInfo
from hardtrain.errors import CheckpointWriteError


class SaveWorker:
    """Runs a save in its thread and hands back the result. Driven by one thread (the
    store's caller); the thread starts with the first save and lives until ``close``."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[CheckpointInfo] | None = None
        self._cancel: threading.Event | None = None  # the save in flight's, set to abandon it

    def start(self, save: Callable[[], CheckpointInfo], cancel: threading.Event) -> None:
        """Run ``save`` in the thread; ``abandon`` sets ``cancel``. Only once ``wait``
        returned: two saves never overlap."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="hardtrain-checkpoint")
        self._inflight = self._executor.submit(save)
        self._cancel = cancel

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """The save in flight's result (None when there is none), or its error. Interrupted
        or timed out, the save stays in flight."""
        inflight = self._inflight
        if inflight is None:
            return None
        try:
            return inflight.result(timeout)
        finally:
            if inflight.done():
                self._inflight = self._cancel = None

    def abandon(self) -> CheckpointInfo | None:
        """Ask the save in flight to stop, and wait for it: its info if it committed anyway."""
        if self._cancel is not None:
            self._cancel.set()
        try:
            return self.wait()
        except CheckpointWriteError:
            return None  # recorded as checkpoint_save_abandoned

    @property
    def busy(self) -> bool:
        """True while a save is still running (never blocks)."""
        return self._inflight is not None and not self._inflight.done()

    def close(self) -> None:
        """Finish the save in flight and stop the thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
