"""Metrics and logs: one ``metrics.jsonl`` line per applied step (rank 0), made durable
before every checkpoint; with a remote ``run_dir``, the logs fetched from it when a run
starts and copied up to it after every checkpoint and at the end."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import fsspec

from hardtrain._loop.protocol import Context, Feature, StepReport, Verdict
from hardtrain._redact import scrub
from hardtrain.checkpoint import CheckpointInfo
from hardtrain.telemetry import EventSink, MetricsLog

_LOGS = ("metrics.jsonl", "events.jsonl")


class Logs(Feature):
    name = "logs"

    def __init__(self, run_dir: str, log_dir: str, storage_options: Mapping[str, Any]) -> None:
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.storage_options = storage_options
        self._metrics: MetricsLog | None = None
        self._upload = False
        self._uploaded: CheckpointInfo | None = None  # the checkpoint the logs went up with

    def open(self, ctx: Context) -> None:
        self._upload = is_remote(self.run_dir) and ctx.rank == 0
        if self._upload:
            self._upload = self._download(ctx.events)
        if ctx.rank == 0:
            self._metrics = MetricsLog(os.path.join(self.log_dir, "metrics.jsonl"))

    def load_state_dict(self, state: Mapping[str, Any] | None,
                        checkpoint: CheckpointInfo) -> None:
        self._uploaded = checkpoint  # a loaded checkpoint is no new commit: nothing to copy

    def after_vote(self, ctx: Context, verdict: Verdict, report: StepReport) -> None:
        if not verdict.skip and self._metrics is not None:
            loss = report.loss if report.loss_value is None else report.loss_value
            self._metrics.write(ctx.state.step, loss, report.lr,
                                time.perf_counter() - report.started)
        if self._upload and ctx.checkpoints is not None and (
            ctx.checkpoints.last is not self._uploaded
        ):
            self._uploaded = ctx.checkpoints.last
            self._copy_up(ctx.events)

    def state_dict(self) -> dict[str, Any] | None:
        """Before a checkpoint: every line up to this step is durable, so a restart that
        resumes here finds the log complete up to it."""
        if self._metrics is not None:
            self._metrics.flush(durable=True)
        return None

    def close(self, ctx: Context, error: BaseException | None) -> None:
        try:
            if self._metrics is not None:
                self._metrics.close()
        finally:
            if self._upload:
                self._copy_up(ctx.events)

    def _pairs(self) -> list[tuple[str, str]]:
        return [(os.path.join(self.log_dir, name), f"{self.run_dir.rstrip('/')}/{name}")
                for name in _LOGS]

    def _copy_up(self, events: EventSink) -> None:
        """Copy the local logs up to a remote run_dir; a failure is an event, never fatal."""
        try:
            fs, _ = fsspec.core.url_to_fs(self.run_dir, **self.storage_options)
            for local, remote in self._pairs():
                if os.path.exists(local):
                    fs.put_file(local, remote)
        except Exception as e:
            events.record("logs_upload_failed", level=logging.WARNING,
                          error=f"{type(e).__name__}: {e}")

    def _download(self, events: EventSink) -> bool:
        """A restart on a new machine continues the logs already in the remote run_dir.
        If they cannot be fetched, the local logs are not copied up (that would replace
        the remote history with a shorter one): an event says so, and False."""
        try:
            fs, _ = fsspec.core.url_to_fs(self.run_dir, **self.storage_options)
            for local, remote in self._pairs():
                if not os.path.exists(local) and fs.exists(remote):
                    fs.get_file(remote, local)
        except Exception as e:
            events.record(
                "logs_download_failed", level=logging.WARNING, error=f"{type(e).__name__}: {e}",
                note=f"logs stay in {self.log_dir} and are not copied up this run",
            )
            return False
        return True


def is_remote(run_dir: str) -> bool:
    protocol = fsspec.core.split_protocol(run_dir)[0]
    return protocol not in (None, "file", "local")


def default_log_dir(run_dir: str) -> str:
    """Where the logs go by default: ``run_dir`` when it is local, else
    ``./hardtrain-logs/<run_dir as a name>`` (no credentials in it)."""
    if not is_remote(run_dir):
        return fsspec.core.strip_protocol(run_dir) if run_dir.startswith("file://") else run_dir
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", scrub(run_dir)).strip("_")
    return os.path.join("hardtrain-logs", name)
