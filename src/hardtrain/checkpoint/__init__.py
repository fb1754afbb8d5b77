"""Checkpoints: where (the store), how (atomic commit, manifest, verify, fallback), async."""

from hardtrain.checkpoint._policy import CheckpointPolicy
from hardtrain.checkpoint._reports import (
    CheckpointFallbackWarning,
    CheckpointInfo,
    FileProblem,
    LoadedCheckpoint,
    SetAsideInfo,
    VerifyReport,
)
from hardtrain.checkpoint._store import CheckpointStore

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "CheckpointPolicy",
    "CheckpointStore",
    "FileProblem",
    "LoadedCheckpoint",
    "SetAsideInfo",
    "VerifyReport",
]
