"""The errors hardtrain raises.

    HardtrainError
    └── CheckpointError
        ├── CheckpointWriteError (also OSError)      a save did not commit
        │   └── CheckpointStorageError               the storage failed it (after retries),
        │                                            or is unusable (preflight), or no save
        │                                            has committed for max_unsaved
        ├── CheckpointCorruptError                   the step asked for, or every committed
        │                                            one, failed verification
        ├── NoCheckpointError (also FileNotFoundError) nothing committed (for that step)
        └── CheckpointMismatchError (also ValueError) the checkpoint does not fit what loads it
            └── EnvironmentChangedError               versions, hardware, flags, code or config
                                                      changed since the checkpoint (refused by
                                                      MetadataPolicy(on_change="refuse"))
    └── NonFiniteLossError (also FloatingPointError)  bad steps persisted through rollbacks
    └── RunDirInUseError                              another live job holds the run_dir's
                                                      lease (or took it over from this one)
    └── UnhealthyDeviceError                          a GPU failed a health probe, or could
                                                      not be checked (hardtrain.health)

    Preempted (a SystemExit, deliberately not an Exception)   fit stopped on a signal


Every message says what happened, with the values, what to do next, and names the runbook
(``runbook`` attribute) for the person on call. Messages are redacted like everything
hardtrain writes: a credential in a path or URL never reaches a log through them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hardtrain._redact import scrub

CHECKPOINT_RUNBOOK = "runbooks/checkpoint-corruption.md"
RESUME_MISMATCH_RUNBOOK = "runbooks/resume-mismatch.md"
PREEMPTION_RUNBOOK = "runbooks/preemption.md"
NAN_RUNBOOK = "runbooks/nan-during-training.md"
ENVIRONMENT_RUNBOOK = "runbooks/environment-changed.md"
STORAGE_RUNBOOK = "runbooks/storage-errors.md"
ECC_RUNBOOK = "runbooks/ecc-errors.md"
XID_RUNBOOK = "runbooks/xid-errors.md"
THROTTLING_RUNBOOK = "runbooks/gpu-throttling.md"
NVLINK_RUNBOOK = "runbooks/nvlink-degraded.md"


class HardtrainError(Exception):
    """Base of every error hardtrain raises on purpose."""

    runbook: str | None = None

    def __init__(self, message: str) -> None:
        if self.runbook and self.runbook not in message:
            message = f"{message} See {self.runbook}"
        super().__init__(scrub(message))


class CheckpointError(HardtrainError):
    """A checkpoint could not be written, read or trusted."""

    runbook = CHECKPOINT_RUNBOOK


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed on some rank; nothing was committed and earlier checkpoints are intact.

    Distributed, every problem (bad input on one rank included) is this error on every
    rank, raised by the same call; a single process raises bad input as TypeError or
    ValueError at once."""


class CheckpointStorageError(CheckpointWriteError):
    """The storage under the run directory failed a save (after retrying what is
    transient), cannot be used at all (the preflight at the start of ``fit``: no bucket,
    no credentials, no permission, no space), or no checkpoint has committed for longer
    than ``CheckpointPolicy.max_unsaved``. Not bad input: the same save may succeed later.
    Nothing was committed; earlier checkpoints are intact."""

    runbook = STORAGE_RUNBOOK


class CheckpointCorruptError(CheckpointError):
    """The step asked for failed verification, or every committed checkpoint did. Never a
    NoCheckpointError: code that starts from scratch when there is no checkpoint must not
    start from scratch over damaged ones."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """There is no committed checkpoint (for the step asked for)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's tensors, ranks or format do not match what is loading it (a
    different model, optimizer, world size, ...). Raised before anything is loaded."""

    runbook = RESUME_MISMATCH_RUNBOOK


class EnvironmentChangedError(CheckpointMismatchError):
    """Something that breaks bit-exactness (torch or CUDA version, world size, GPU model,
    determinism flags, NCCL_ALGO, the code, the config) differs from the checkpoint's
    ``run.json``, or the checkpoint has no readable ``run.json``, and
    ``MetadataPolicy(on_change="refuse")`` asked not to resume then. Raised before
    anything goes into the model, optimizer or data. ``changes``: the ``MetadataChange``
    list (empty when there was nothing to compare with)."""

    runbook = ENVIRONMENT_RUNBOOK

    def __init__(self, message: str, changes: list[Any] | None = None) -> None:
        super().__init__(message)
        self.changes = list(changes or [])


class NonFiniteLossError(HardtrainError, FloatingPointError):
    """Bad steps (NaN/Inf loss or gradients, loss spikes) persisted through
    ``NanPolicy.max_rollbacks`` rollbacks, or there was nothing to roll back to. The message
    holds the diagnosis: the failing steps, the rank that saw it first, and the recent
    loss, gradient-norm and lr history."""

    runbook = NAN_RUNBOOK


class RunDirInUseError(HardtrainError):
    """Another job holds the run directory's lease (``lease.json``) and is alive: on this
    host its process runs; from another host, its heartbeat advanced while this job
    watched. Raised on every rank before the first step, with nothing written to the run
    directory. Also raised during a run when another job took the lease over (it judged
    this one dead): at the next step, without saving.

    holder: the other job's lease as JSON (``host``, ``pid``, ``process_started_at``,
    ``job_started_at``, ``beat``, ``beat_at``, ``heartbeat_s``; times in Unix seconds),
    or None when its lease file could not be parsed.
    """

    runbook = STORAGE_RUNBOOK

    def __init__(self, message: str, holder: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = None if holder is None else dict(holder)


class UnhealthyDeviceError(HardtrainError):
    """A GPU failed a health probe (``hardtrain.health``), or the probes could not check
    it and the caller did not accept that (``HealthReport.raise_for_status``).

    report: the whole ``HealthReport``. result: the first problem (a ``ProbeResult``);
    gpu, uuid, probe, value: its GPU index and UUID (None: the host), probe name and
    value. runbook: that probe's runbook.
    """

    def __init__(self, message: str, *, report: Any = None, result: Any = None) -> None:
        self.runbook = getattr(result, "runbook", None)
        super().__init__(message)
        self.report = report
        self.result = result
        self.gpu: int | None = getattr(result, "gpu", None)
        self.uuid: str | None = getattr(result, "uuid", None)
        self.probe: str | None = getattr(result, "probe", None)
        self.value: Any = getattr(result, "value", None)


class Preempted(SystemExit):
    """``fit`` stopped because the process is about to be killed (a preemption signal).

    A ``SystemExit``, so that ``except Exception`` in user code does not catch it, code
    after ``fit`` never runs as if training had finished, and the process exits with
    ``code`` (by default 128 + the signal's number: 143 for SIGTERM), which restart
    policies (Kubernetes, SLURM ``--requeue``, torchrun ``--max-restarts``) treat as
    "restart me". Start the same command again to continue from ``checkpoint``.

    step: the step every rank stopped after. signal: the signal's name.
    checkpoint: the newest committed checkpoint (``CheckpointInfo``), or None.
    saved: whether ``step`` itself was checkpointed before exiting.
    """

    runbook = PREEMPTION_RUNBOOK

    def __init__(self, code: int, message: str, *, step: int, signal: str | None,
                 checkpoint: Any, saved: bool) -> None:
        super().__init__(code)
        self.message = f"{message} See {self.runbook}"
        self.step = step
        self.signal = signal
        self.checkpoint = checkpoint
        self.saved = saved

    def __str__(self) -> str:
        return self.message
