"""What the checkpoint store returns and warns with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch

from hardtrain.checkpoint._format import step_dir_name


class CheckpointFallbackWarning(UserWarning):
    """A committed checkpoint failed verification and an older one is used instead."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint folder, as its manifest describes it (nothing read beyond that)."""

    step: int
    path: str
    committed: bool
    created: datetime | None = None
    num_bytes: int | None = None
    world_size: int | None = None
    problem: str | None = None  # why the manifest could not be read, if it could not
    blocking_s: float | None = None  # for a save just made: time the caller was blocked
    persist_s: float | None = None  # ... and time writing and committing took after that


@dataclass(frozen=True)
class SetAsideInfo:
    """A checkpoint folder set aside (renamed ``step-N.rejected-...``): loading and
    retention pass it by; hardtrain never deletes it."""

    step: int
    path: str
    reason: str | None  # from the folder's SET-ASIDE.json; None when it has none
    set_aside: datetime | None = None


@dataclass(frozen=True)
class FileProblem:
    file: str
    # missing | wrong size | wrong checksum | unreadable | not committed | manifest, and for a
    # file that matches its manifest: malformed | over cap | inconsistent (the state)
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason} ({self.detail})"


@dataclass(frozen=True)
class VerifyReport:
    """Every file of one checkpoint checked against its manifest."""

    step: int
    path: str
    problems: tuple[FileProblem, ...]
    ignored: tuple[str, ...] = ()  # files in the folder the manifest does not name
    num_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        folder = step_dir_name(self.step)
        if self.ok:
            return f"{folder}: ok, {self.num_files} files verified"
        return f"{folder}: " + "; ".join(str(p) for p in self.problems)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What ``load`` returns; also unpacks as ``tensors, state = store.load()``."""

    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: str = field(default="")

    def __iter__(self) -> Iterator[Any]:
        return iter((self.tensors, self.state))
