"""Where a store's checkpoints lie, and what this run has learned about them.

The parts of the store (writing, loading, verifying, retention) share one ``Place``;
nothing here is collective except ``Place.group``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hardtrain import _dist
from hardtrain._files import NotRegularFileError
from hardtrain.checkpoint._format import (
    MANIFEST,
    Manifest,
    ManifestError,
    check_manifest_size,
    decode_manifest,
    parse_step_dir,
    step_dir_name,
)
from hardtrain.checkpoint._storage import Storage
from hardtrain.telemetry import EventSink

CHECKPOINTS = "checkpoints"
# Each store its own group: two stores must not run collectives on one group from two
# threads at once. The role is only this process's key; ranks pair groups by the order
# in which they are created (at the store's first collective call), as before.
_STORE_NUMBERS = itertools.count()


@dataclass
class Place:
    """One store's checkpoints under ``root``, read and written through ``storage``."""

    root: str
    storage: Storage
    events: EventSink
    keep_last: int | None
    rejected: dict[int, str] = field(default_factory=dict)  # step: why it failed to verify
    role: str = field(default_factory=lambda: f"checkpoint:{next(_STORE_NUMBERS)}")

    def folder(self, step: int) -> str:
        """``step``'s folder relative to the root, as ``storage`` takes it."""
        return f"{CHECKPOINTS}/{step_dir_name(step)}"

    def location(self, relative: str) -> str:
        """``relative`` under the root as the caller gave it: for messages and infos."""
        return f"{self.root.rstrip('/')}/{relative}"

    def path(self, step: int) -> str:
        return self.location(self.folder(step))

    def group(self) -> Any:
        """The store's gloo group; None with a single process. Collective on first use:
        call it only where every rank is."""
        return _dist.groups.get(self.role)

    def steps(self) -> list[int]:
        """The steps that have a folder (or an entry in a folder's place: a symlink, ...),
        committed or not, oldest first. NotRegularFileError when ``checkpoints`` itself
        is a symlink or anything but a folder: never followed, and never taken for "no
        checkpoints" (a resume would start over)."""
        names = self.storage.listdir(CHECKPOINTS)
        if names is None:
            try:
                there = "regular file" if self.storage.size(CHECKPOINTS) is not None else ""
            except NotRegularFileError as e:
                there = e.kind
            if there:
                raise NotRegularFileError(f"{CHECKPOINTS}: not a folder: {there} (never "
                                          "followed)", there, CHECKPOINTS)
        return sorted(s for s in map(parse_step_dir, names or []) if s is not None)

    def committed(self, step: int) -> bool | str:
        """Whether ``step`` has its manifest; a str (what stands there) when its folder
        or its manifest is a symlink, a FIFO or anything else hardtrain never follows or
        opens: damage, treated as a committed checkpoint that fails verification.
        NotRegularFileError when ``checkpoints`` itself is such an entry."""
        try:
            return self.storage.size(f"{self.folder(step)}/{MANIFEST}") is not None
        except NotRegularFileError as e:
            if e.path == CHECKPOINTS:
                raise
            return f"{e} (never followed or opened)"

    def manifest_exists(self, step: int) -> bool:
        """Whether ``step`` is committed (or looks so: see ``committed``)."""
        return self.committed(step) is not False

    def read_manifest(self, step: int) -> Manifest:
        """FileNotFoundError: ``step`` is not committed. ManifestError: its manifest is
        damaged or unreadable (a symlink or a FIFO in its or its folder's place too)."""
        path = f"{self.folder(step)}/{MANIFEST}"
        try:
            missing = self.storage.size(path) is None
        except NotRegularFileError as e:
            raise ManifestError(f"unreadable ({type(e).__name__}: {e})") from None
        if missing:
            raise FileNotFoundError(path)
        try:
            with self.storage.read(path) as view:
                check_manifest_size(len(view))  # before a byte of it is copied or parsed
                data = bytes(view)
        except OSError as e:
            raise ManifestError(f"unreadable ({type(e).__name__}: {e})") from None
        return decode_manifest(data, step)
