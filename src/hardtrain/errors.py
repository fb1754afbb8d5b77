"""The errors hardtrain raises.

    HardtrainError
    └── CheckpointError
        ├── CheckpointWriteError (also OSError)      a save did not commit
        ├── CheckpointCorruptError                   a named checkpoint failed verification
        ├── NoCheckpointError (also FileNotFoundError) nothing committed and verified to load
        └── CheckpointMismatchError (also ValueError) the checkpoint does not fit what loads it

Every message says what happened, with the values, what to do next, and names the runbook
(``runbook`` attribute) for the person on call.
"""

from __future__ import annotations

CHECKPOINT_RUNBOOK = "runbooks/checkpoint-corruption.md"


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
    """A save failed on some rank; nothing was committed and earlier checkpoints are intact."""


class CheckpointCorruptError(CheckpointError):
    """An explicitly requested checkpoint failed verification (no fallback was allowed)."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No committed checkpoint verifies, or the store holds none."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's tensors, ranks or format do not match what is loading it."""
