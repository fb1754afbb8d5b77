"""Checking checkpoint files against their manifest, and rejecting a step that fails.

Nothing here is collective; each function works on what this rank sees.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence

from hardtrain._redact import scrub
from hardtrain.checkpoint._format import (
    CHUNK_BYTES,
    MANIFEST,
    FileEntry,
    Manifest,
    ManifestError,
    check_step,
    compare_digests,
    digest_of,
    is_tmp_name,
    looks_like_pickle,
    manifest_gaps,
    state_file,
    tensors_file,
)
from hardtrain.checkpoint._place import Place
from hardtrain.checkpoint._read import Problem, content_problem, parse_state
from hardtrain.checkpoint._reports import CheckpointFallbackWarning, FileProblem, VerifyReport
from hardtrain.checkpoint._safetensors import header_length, parse_safetensors
from hardtrain.errors import CHECKPOINT_RUNBOOK, CheckpointCorruptError, NoCheckpointError


def check_file(
    place: Place,
    step: int,
    entry: FileEntry,
    read: Callable[[memoryview], Problem | None] | None = None,
) -> FileProblem | None:
    """Check one file's size, then its checksums and, for a rank's own two files, their
    content: through ``read`` (which verifies and parses while it reads, and returns the
    problem) or on their own (``check_content``, with the same parsers). An error of the
    storage is "unreadable"; anything else it raises is not about this file."""
    path = f"{place.folder(step)}/{entry.name}"
    try:
        size = place.storage.size(path)
        if size is None:
            return FileProblem(entry.name, "missing", "the manifest names it")
        if size != entry.num_bytes:
            hint = " (truncated?)" if size < entry.num_bytes else ""
            return FileProblem(
                entry.name, "wrong size",
                f"{size} bytes, manifest says {entry.num_bytes}{hint}",
            )
        if read is None:
            bad = compare_digests(place.storage.digest(path), entry.digest, CHUNK_BYTES)
            problem = ("wrong checksum", bad) if bad is not None else check_content(
                place, path, entry)
        else:
            with place.storage.read(path) as view:
                problem = read(view)
    except (OSError, ValueError) as e:
        return FileProblem(entry.name, "unreadable", f"{type(e).__name__}: {e}")
    return None if problem is None else FileProblem(entry.name, *problem)


def check_content(place: Place, path: str, entry: FileEntry) -> Problem | None:
    """A verified file's content, parsed as loading parses it (not its tensors' bytes): a
    rank's safetensors header and its JSON state; other files are only verified. Raises
    what the storage raises."""
    try:
        if entry.name == tensors_file(entry.rank):
            length = header_length(place.storage.read_head(path, 8), entry.num_bytes)
            parse_safetensors(place.storage.read_head(path, 8 + length), entry.num_bytes)
        elif entry.name == state_file(entry.rank):
            parse_state(place.storage.read_head(path, entry.num_bytes))
    except OSError:
        raise
    except Exception as e:
        return content_problem(e)
    return None


MAX_LISTED_PROBLEMS = 32  # in a report, one by one; the rest are counted


def verify(place: Place, step: int) -> VerifyReport:
    """Every file of ``step`` (all ranks) checked against its manifest, and the content
    of each rank's safetensors header and JSON state parsed as loading parses it."""
    problems: list[FileProblem] = []
    num_files = 0
    manifest: Manifest | None = None
    try:
        manifest = place.read_manifest(step)
    except FileNotFoundError:
        problems.append(FileProblem(MANIFEST, "not committed", "no manifest in the folder"))
    except ManifestError as e:
        problems.append(FileProblem(MANIFEST, "manifest", str(e)))
    else:
        problems += [FileProblem(*gap) for gap in manifest_gaps(manifest)]
        num_unlisted = 0
        for entry in manifest.files.values():
            num_files += 1
            problem = check_file(place, step, entry)
            if problem is not None and len(problems) >= MAX_LISTED_PROBLEMS:
                num_unlisted += 1
            elif problem is not None:
                problems.append(problem)
        if num_unlisted:
            problems.append(FileProblem("...", "more", f"{num_unlisted} more files fail"))
    named = set(manifest.files) if manifest is not None else set()
    return VerifyReport(
        step, place.path(step), tuple(problems), _ignored(place, step, named), num_files
    )


def _ignored(place: Place, step: int, named: set[str]) -> tuple[str, ...]:
    """Files in the folder that the manifest does not name: never loaded. A pickle
    among them is named as such, and it is never opened beyond its first bytes."""
    folder = place.folder(step)
    named = named | {MANIFEST}
    ignored = []
    for name in sorted(place.storage.listdir(folder) or []):
        if name in named or is_tmp_name(name):
            continue
        with contextlib.suppress(OSError):
            if looks_like_pickle(name, place.storage.read_head(f"{folder}/{name}", 2)):
                name += " (pickle: never loaded)"
        ignored.append(name)
    return tuple(ignored)


def read_file(place: Place, step: int, name: str) -> bytes:
    """One file of committed ``step``, verified against the manifest (errors as
    ``CheckpointStore.read_file`` documents them)."""
    check_step(step)
    folder = place.path(step)
    try:
        manifest = place.read_manifest(step)
    except FileNotFoundError:
        raise NoCheckpointError(f"no committed checkpoint at {folder}") from None
    except ManifestError as e:
        raise CheckpointCorruptError(f"{folder}/{MANIFEST} {e}") from None
    entry = manifest.files.get(name)
    if entry is None:
        raise FileNotFoundError(f"{folder} holds no {name} (its manifest does not name it)")
    data = b""

    def read(view: memoryview) -> Problem | None:
        nonlocal data
        data = bytes(view)
        bad = compare_digests(digest_of(data), entry.digest, CHUNK_BYTES)
        return None if bad is None else ("wrong checksum", bad)

    problem = check_file(place, step, entry, read)
    if problem is not None:
        raise CheckpointCorruptError(f"{folder}: {problem}")
    return data


def reject(place: Place, step: int, problems: Sequence[object], file: str | None) -> None:
    """Remember ``step`` as damaged for the rest of the run: a warning and an event.
    Called from the functions behind ``CheckpointStore.load`` and ``latest`` only."""
    place.rejected[step] = "; ".join(map(str, problems))
    message = (
        f"{place.path(step)}: {place.rejected[step]}; ignoring it and falling back "
        f"to the previous checkpoint. See {CHECKPOINT_RUNBOOK}"
    )
    # past this function, its caller and the store's method: the line that called the store
    warnings.warn(scrub(message), CheckpointFallbackWarning, stacklevel=4)
    place.events.record(
        "checkpoint_rejected", level=logging.WARNING, step=step, file=file,
        reason=place.rejected[step],
    )
