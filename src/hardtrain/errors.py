"""The errors hardtrain raises.

    HardtrainError
    └── CheckpointError
        ├── CheckpointWriteError (also OSError)      a save did not commit
        ├── CheckpointCorruptError                   the step asked for, or every committed
        │                                            one, failed verification
        ├── NoCheckpointError (also FileNotFoundError) nothing committed (for that step)
        └── CheckpointMismatchError (also ValueError) the checkpoint does not fit what loads it

Every message says what happened, with the values, what to do next, and names the runbook
(``runbook`` attribute) for the person on call.
"""

from __future__ import annotations

CHECKPOINT_RUNBOOK = "runbooks/checkpoint-corruption.md"
RESUME_MISMATCH_RUNBOOK = "runbooks/resume-mismatch.md"


class HardtrainError(Exception):
    """Base of every error hardtrain raises on purpose."""

    runbook: str | None = None

    def __init__(self, message: str) -> None:
        if self.runbook and self.runbook not in message:
            message = f"{message} See {self.runbook}"
        super().__init__(message)


class CheckpointError(HardtrainError):
    """A checkpoint could not be written, read or trusted."""

    runbook = CHECKPOINT_RUNBOOK


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed on some rank; nothing was committed and earlier checkpoints are intact.

    Distributed, every problem (bad input on one rank included) is this error on every
    rank, raised by the same call; a single process raises bad input as TypeError or
    ValueError at once."""


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
