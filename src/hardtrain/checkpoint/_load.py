"""Loading: this rank's verified tensors and state from the newest checkpoint that
verifies on every rank, the ranks falling back past damaged ones together."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hardtrain import _dist
from hardtrain.checkpoint._format import (
    MANIFEST,
    ManifestError,
    check_step,
    manifest_gaps,
    state_file,
    step_dir_name,
    tensors_file,
)
from hardtrain.checkpoint._place import CHECKPOINTS, Place
from hardtrain.checkpoint._read import (
    Problem,
    TensorRead,
    content_problem,
    read_json,
    read_tensors,
)
from hardtrain.checkpoint._reports import FileProblem, LoadedCheckpoint
from hardtrain.checkpoint._verify import check_file, reject
from hardtrain.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    NoCheckpointError,
)


@dataclass
class _Attempt:
    loaded: LoadedCheckpoint | None = None
    problems: list[FileProblem] = field(default_factory=list)
    mismatch: str | None = None
    error: str | None = None  # something other than the checkpoint went wrong (I/O, ...)


def load(
    place: Place,
    step: int | None,
    out: Mapping[str, torch.Tensor] | None,
    rank: int | None,
    check: Callable[[LoadedCheckpoint], None] | None = None,
) -> LoadedCheckpoint:
    """What ``CheckpointStore.load`` documents. Collective when distributed and ``rank``
    is None: every rank then tries the same steps, and hears of every rank's trouble.

    The rule for damage: whatever fails to read, parse, decode or fit a committed step's
    files (its checksums, its parsers, a cap, ``check``) is damage of that step, which is
    rejected and the ranks fall back together. Only the storage failing now (an error
    from outside the files' content) rejects nothing: every rank raises it."""
    own_rank, world_size = _dist.rank_and_world_size()
    collective = world_size > 1 and rank is None
    group = place.group() if collective else None
    if step is not None:
        check_step(step)
    candidates, error = None, None
    if own_rank == 0 or not collective:  # rank 0 lists; every rank tries the same steps
        try:
            candidates = _candidates(place, step)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    candidates, error = _dist.all_gather_json([candidates, error], group)[0]
    if error is not None or candidates is None:
        raise CheckpointError(f"cannot list the checkpoints under {place.root}: {error}")
    if not candidates:
        what = f"for step {step}" if step is not None else "(there is none)"
        raise NoCheckpointError(f"no committed checkpoint under {place.root} {what}.")
    read_rank, expected_world = (own_rank, world_size) if rank is None else (rank, None)
    for candidate in candidates:
        try:
            attempt = _load_one(place, candidate, read_rank, expected_world, out)
            if attempt.loaded is not None and check is not None:
                attempt = _check(attempt.loaded, check, state_file(read_rank))
        except Exception as e:  # I/O trouble, not damage: every rank must hear of it
            attempt = _Attempt(error=f"{type(e).__name__}: {e}")
        summaries = _dist.all_gather_json({
            "error": attempt.error, "mismatch": attempt.mismatch,
            "problems": [str(p) for p in attempt.problems],
            "files": [p.file for p in attempt.problems],
        }, group)
        problems = _problems(place, candidate, summaries, collective)
        if not problems and attempt.loaded is not None:
            place.events.record("checkpoint_loaded", step=candidate)
            return attempt.loaded
        if step is not None:
            raise CheckpointCorruptError(
                f"{place.path(candidate)} failed verification: " + "; ".join(problems)
                + ". Load another step, or call load() to fall back to the newest good one."
            )
        reject(place, candidate, problems, next(iter(_collect(summaries, "files", False)), None))
    rejected = "; ".join(f"{step_dir_name(s)}: {r}" for s, r in sorted(place.rejected.items()))
    raise CheckpointCorruptError(
        f"every committed checkpoint under {place.root}/{CHECKPOINTS} failed verification "
        f"({rejected}). Restore one from a backup; to start over on purpose, move them "
        "away first."
    )


def _check(loaded: LoadedCheckpoint, check: Callable[[LoadedCheckpoint], None],
           file: str) -> _Attempt:
    """The caller's ``check`` of a verified checkpoint: a CheckpointMismatchError is a
    mismatch, anything else it raises (a KeyError, a decoding error) damage."""
    try:
        check(loaded)
    except CheckpointMismatchError as e:
        return _Attempt(mismatch=str(e))
    except Exception as e:
        reason, detail = content_problem(e)
        return _Attempt(problems=[FileProblem(
            file, "inconsistent" if reason == "malformed" else reason, detail)])
    return _Attempt(loaded)


def _candidates(place: Place, step: int | None) -> list[int]:
    """Committed steps to try, newest first: all not yet rejected, or just ``step``."""
    if step is not None:
        return [step] if place.manifest_exists(step) else []
    return [
        s for s in reversed(place.steps())
        if s not in place.rejected and place.manifest_exists(s)
    ]


def _problems(
    place: Place, step: int, summaries: Sequence[dict[str, Any]], by_rank: bool
) -> list[str]:
    """Every rank's verification problems with ``step``; raises, on every rank alike,
    when a rank could not read it or it does not fit."""
    if errors := _collect(summaries, "error", by_rank):
        raise CheckpointError(
            f"loading {place.path(step)} failed: " + "; ".join(errors)
            + ". Nothing was rejected; fix the storage and retry."
        )
    if mismatches := _collect(summaries, "mismatch", by_rank):
        raise CheckpointMismatchError(
            f"{place.path(step)} does not fit: " + "; ".join(mismatches) + "."
        )
    return _collect(summaries, "problems", by_rank)


def _load_one(
    place: Place,
    step: int,
    rank: int,
    world_size: int | None,
    out: Mapping[str, torch.Tensor] | None,
) -> _Attempt:
    """Verify and read one rank's files of one step."""
    try:
        manifest = place.read_manifest(step)
    except FileNotFoundError:
        return _Attempt(problems=[FileProblem(MANIFEST, "not committed", "no manifest")])
    except ManifestError as e:
        return _Attempt(problems=[FileProblem(MANIFEST, "manifest", str(e))])
    if world_size is not None and manifest.world_size != world_size:
        return _Attempt(mismatch=(
            f"written by {manifest.world_size} rank(s), this job has {world_size}; resume "
            "with the same world size (or pass rank= to read one rank's files)"
        ))
    if not 0 <= rank < manifest.world_size:
        return _Attempt(mismatch=f"has ranks 0..{manifest.world_size - 1}, not rank {rank}")
    problems = [FileProblem(*gap) for gap in manifest_gaps(manifest)]
    tensor_entry = manifest.files.get(tensors_file(rank))
    state_entry = manifest.files.get(state_file(rank))
    if problems or tensor_entry is None or state_entry is None:
        return _Attempt(problems=problems or [
            FileProblem(tensors_file(rank), "missing", f"the manifest has no rank {rank}")
        ])
    state: dict[str, Any] = {}
    read = TensorRead()

    def read_state(view: memoryview) -> Problem | None:
        value, bad = read_json(view, state_entry.digest.chunks, manifest.chunk_bytes)
        state.update(value or {})
        return bad

    def read_own_tensors(view: memoryview) -> Problem | None:
        nonlocal read
        read = read_tensors(view, tensor_entry.digest.chunks, manifest.chunk_bytes, out)
        return read.problem

    readers = {state_entry.name: read_state, tensor_entry.name: read_own_tensors}
    own = sorted((e for e in manifest.files.values() if e.rank == rank), key=lambda e: e.name)
    for entry in own:  # every file of this rank is verified; the two known ones are read
        problem = check_file(place, step, entry, readers.get(entry.name))
        if problem is not None:
            return _Attempt(problems=[problem])
        if read.mismatch:
            return _Attempt(mismatch="; ".join(read.mismatch))
    return _Attempt(LoadedCheckpoint(step, read.tensors, state, place.path(step)))


def _collect(summaries: Sequence[dict[str, Any]], key: str, by_rank: bool) -> list[str]:
    """The non-empty ``key`` values of every rank's summary, labelled by rank if asked."""
    found = []
    for rank, summary in enumerate(summaries):
        value = summary[key]
        for item in value if isinstance(value, list) else [value]:
            if item:
                found.append(f"rank {rank}: {item}" if by_rank else str(item))
    return found
