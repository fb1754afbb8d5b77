"""Run metadata: captured when ``fit`` opens (git, config, versions, hardware; secrets
redacted), written as ``run.json`` (and ``git-diff.patch``) into every checkpoint by rank
0, and compared with the checkpoint's on resume: a change that breaks bit-exactness warns,
or refuses before anything is loaded."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from typing import Any

from hardtrain import _dist
from hardtrain._loop.protocol import Context, Feature
from hardtrain._redact import scrub
from hardtrain.checkpoint import CheckpointInfo
from hardtrain.errors import ENVIRONMENT_RUNBOOK, EnvironmentChangedError
from hardtrain.metadata import (
    METADATA_FILE,
    EnvironmentChangedWarning,
    MetadataChange,
    MetadataPolicy,
    capture,
    metadata_changes,
    metadata_files,
)


class RunMetadata(Feature):
    """config and seed: the trainer's, recorded as they were given."""

    name = "metadata"

    def __init__(self, policy: MetadataPolicy, config: Any, seed: int | None) -> None:
        self.policy = policy
        self.config = config
        self.seed = seed
        self._now: dict[str, Any] = {}
        self._files: dict[str, bytes] = {}

    def open(self, ctx: Context) -> None:
        """Collective. Rank 0 captures in full; the other ranks only send their host and
        device. (The loop opens this after setting deterministic kernels.)"""
        self._now = capture(self.config, seed=self.seed, repo=self.policy.repo, nvml=None,
                            group=ctx.group, full=ctx.rank == 0)
        self._files = metadata_files(self._now) if ctx.rank == 0 else {}

    def files(self) -> Mapping[str, bytes]:
        return self._files

    def check_resume(self, ctx: Context, checkpoint: CheckpointInfo) -> None:
        """Collective when distributed. Compare this run's metadata with the checkpoint's
        run.json (rank 0 reads and compares for all); a change that breaks bit-exactness
        warns, or raises under ``on_change="refuse"``, before anything is loaded into the
        user's objects. A run.json that is missing or unreadable cannot vouch for the
        environment: an event, and under "refuse" an error."""
        assert ctx.checkpoints is not None
        step, path = checkpoint.step, checkpoint.path
        found: dict[str, Any] = {}
        if ctx.rank == 0:
            try:
                saved = json.loads(ctx.checkpoints.read_file(step, METADATA_FILE))
                found["changes"] = [c.as_json() for c in metadata_changes(saved, self._now)]
            except FileNotFoundError:
                found["missing"] = f"the checkpoint has no {METADATA_FILE}"
            except Exception as e:  # every rank must hear of it, not only rank 0
                found["missing"] = (f"its {METADATA_FILE} could not be read or compared "
                                    f"({type(e).__name__}: {e})")
        found = _dist.all_gather_json(found, ctx.group)[0]
        on_change = self.policy.on_change
        if "missing" in found:
            if ctx.rank == 0:
                ctx.events.record("metadata_missing", level=logging.WARNING, step=step,
                                  path=path, reason=found["missing"], on_change=on_change)
            if on_change == "refuse":
                raise EnvironmentChangedError(
                    f"{path}: {found['missing']}, so nothing shows the environment it was "
                    "written in, and MetadataPolicy(on_change='refuse') asked not to resume "
                    "then. Nothing was loaded into the model, optimizer or data, and the "
                    "checkpoints are untouched. Pass "
                    "MetadataPolicy(on_change='warn') to resume anyway.")
            return
        changes = [MetadataChange(**c) for c in found["changes"]]
        breaking = [c for c in changes if c.breaks_exactness]
        if changes and ctx.rank == 0:
            ctx.events.record(
                "environment_changed", level=logging.WARNING if breaking else logging.INFO,
                step=step, path=path, on_change=on_change,
                changes=[c.as_json() for c in breaking],
                other_changes=[c.as_json() for c in changes if not c.breaks_exactness],
            )
        if breaking:
            self._refuse_or_warn(ctx, path, breaking)

    def _refuse_or_warn(self, ctx: Context, path: str, breaking: list[MetadataChange]) -> None:
        message = (f"{path} was written with another environment: "
                   + "; ".join(map(str, breaking)) + ".")
        if self.policy.on_change == "refuse":
            raise EnvironmentChangedError(
                f"{message} Resuming could not reproduce an uninterrupted run bit for bit, and "
                "MetadataPolicy(on_change='refuse') asked not to: nothing was loaded into the "
                "model, optimizer or data, and the checkpoints are untouched. Restore "
                "that environment, or pass MetadataPolicy(on_change='warn') to resume anyway.",
                breaking)
        if ctx.rank == 0:
            warnings.warn(
                f"{message} The resumed run may differ from an uninterrupted one; "
                f"`hardtrain metadata {scrub(ctx.run_dir)}` shows every difference. "
                f"See {ENVIRONMENT_RUNBOOK}", EnvironmentChangedWarning, stacklevel=5)
