"""hardtrain: make a PyTorch training job survive what kills long runs.

Importing hardtrain has no side effects: no handlers, no logging set-up, no env reads.
"""

from hardtrain._version import __version__
from hardtrain.checkpoint import (
    CheckpointFallbackWarning,
    CheckpointInfo,
    CheckpointPolicy,
    CheckpointStore,
    FileProblem,
    LoadedCheckpoint,
    VerifyReport,
)
from hardtrain.determinism import seed_everything, set_deterministic
from hardtrain.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointStorageError,
    CheckpointWriteError,
    EnvironmentChangedError,
    HardtrainError,
    NoCheckpointError,
    NonFiniteLossError,
    Preempted,
    RunDirInUseError,
    UnhealthyDeviceError,
)
from hardtrain.health import HealthReport
from hardtrain.metadata import (
    EnvironmentChangedWarning,
    MetadataChange,
    MetadataPolicy,
    capture_metadata,
)
from hardtrain.numerics import NanPolicy
from hardtrain.preemption import PreemptionGuard, PreemptionPolicy
from hardtrain.telemetry import EventLog
from hardtrain.trainer import FitResult, HardenedTrainer

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointPolicy",
    "CheckpointStorageError",
    "CheckpointStore",
    "CheckpointWriteError",
    "EnvironmentChangedError",
    "EnvironmentChangedWarning",
    "EventLog",
    "FileProblem",
    "FitResult",
    "HardenedTrainer",
    "HardtrainError",
    "HealthReport",
    "LoadedCheckpoint",
    "MetadataChange",
    "MetadataPolicy",
    "NanPolicy",
    "NoCheckpointError",
    "NonFiniteLossError",
    "Preempted",
    "PreemptionGuard",
    "PreemptionPolicy",
    "RunDirInUseError",
    "UnhealthyDeviceError",
    "VerifyReport",
    "__version__",
    "capture_metadata",
    "seed_everything",
    "set_deterministic",
]
