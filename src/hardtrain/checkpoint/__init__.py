"""Checkpoints: where (the store), how (atomic commit, manifest, verify, fallback), async."""

from hardtrain.checkpoint._store import (
    CheckpointFallbackWarning,
    CheckpointInfo,
    CheckpointStore,
    FileProblem,
    LoadedCheckpoint,
    VerifyReport,
)

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "CheckpointStore",
    "FileProblem",
    "LoadedCheckpoint",
    "VerifyReport",
]
