"""hardtrain: make a PyTorch training job survive what kills long runs.

Importing hardtrain has no side effects: no handlers, no logging set-up, no env reads.
"""

from hardtrain.checkpoint import (
    CheckpointFallbackWarning,
    CheckpointInfo,
    CheckpointStore,
    FileProblem,
    LoadedCheckpoint,
    VerifyReport,
)
from hardtrain.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    HardtrainError,
    NoCheckpointError,
)
from hardtrain.telemetry import EventLog

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointStore",
    "CheckpointWriteError",
    "EventLog",
    "FileProblem",
    "HardtrainError",
    "LoadedCheckpoint",
    "NoCheckpointError",
    "VerifyReport",
    "__version__",
]
