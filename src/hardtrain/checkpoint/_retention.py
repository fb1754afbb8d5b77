"""Listing the checkpoints, finding the newest good one, deleting what is not kept and
setting aside (never deleting) what failed verification. Not collective: retention runs
on rank 0 after a commit."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from datetime import datetime, timezone

from hardtrain._files import NotRegularFileError
from hardtrain.checkpoint._format import (
    LOADABLE_SUFFIXES,
    MANIFEST,
    SET_ASIDE_NOTE,
    TEXT_SUFFIXES,
    ManifestError,
    is_tmp_name,
    parse_set_aside_dir,
    set_aside_dir_name,
)
from hardtrain.checkpoint._place import CHECKPOINTS, Place
from hardtrain.checkpoint._reports import CheckpointInfo, SetAsideInfo
from hardtrain.checkpoint._tmpfiles import removable
from hardtrain.checkpoint._verify import reject, verify


def list_checkpoints(place: Place, include_uncommitted: bool) -> list[CheckpointInfo]:
    """Committed checkpoints (and, if asked, uncommitted folders), oldest first, as their
    manifests describe them."""
    infos = []
    for step in place.steps():
        path = place.path(step)
        try:
            manifest = place.read_manifest(step)
        except FileNotFoundError:
            if include_uncommitted:
                infos.append(CheckpointInfo(step, path, committed=False))
            continue
        except ManifestError as e:
            infos.append(CheckpointInfo(step, path, True, problem=f"{MANIFEST} {e}"))
            continue
        infos.append(
            CheckpointInfo(
                step, path, True, manifest.created, manifest.num_bytes, manifest.world_size
            )
        )
    return infos


def latest(place: Place) -> CheckpointInfo | None:
    """The newest committed checkpoint that verifies, or None; damaged ones on the way
    are rejected."""
    for info in reversed(list_checkpoints(place, False)):
        if info.step in place.rejected:
            continue
        report = verify(place, info.step)
        if report.ok:
            return info
        reject(place, info.step, report.problems, report.problems[0].file)
    return None


def list_set_aside(place: Place) -> list[SetAsideInfo]:
    """Folders set aside (damaged, or abandoned by a rollback), oldest step first, with
    the reason their note gives."""
    infos = []
    for name in sorted(place.storage.listdir(CHECKPOINTS) or []):
        step = parse_set_aside_dir(name)
        if step is None:
            continue
        reason, when = _read_note(place, f"{CHECKPOINTS}/{name}")
        infos.append(SetAsideInfo(step, place.location(f"{CHECKPOINTS}/{name}"), reason, when))
    return sorted(infos, key=lambda info: (info.step, info.path))


def _read_note(place: Place, folder: str) -> tuple[str | None, datetime | None]:
    """A set-aside folder's reason and time; (None, None) when its note is missing or not
    what hardtrain writes (it is only read, and only its first 64 KiB)."""
    try:
        note = json.loads(place.storage.read_head(f"{folder}/{SET_ASIDE_NOTE}", 64 << 10))
        reason, when = note["reason"], note["set_aside"]
        if not isinstance(reason, str) or not isinstance(when, (int, float)):
            return None, None
        return reason, datetime.fromtimestamp(when, timezone.utc)
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None, None


def set_aside(place: Place, step: int, reason: str) -> None:
    """Rename ``step``'s folder out of loading's sight and leave a note in it saying why
    (kept for diagnosis, never deleted by hardtrain); an event."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    aside = f"{CHECKPOINTS}/{set_aside_dir_name(step, stamp)}"
    place.storage.move(place.folder(step), aside)
    note = {"step": step, "reason": reason, "set_aside": time.time(),
            "host": socket.gethostname(), "pid": os.getpid()}
    try:
        place.storage.write_bytes(f"{aside}/{SET_ASIDE_NOTE}", json.dumps(note).encode())
        note_error = {}
    except OSError as e:  # the folder is aside all the same; the event keeps the reason
        note_error = {"note_error": f"{type(e).__name__}: {e}"}
    place.events.record("checkpoint_set_aside", level=logging.WARNING, step=step,
                        to=place.location(aside), reason=reason, **note_error)


def clean_up(place: Place, step: int, committed: set[str]) -> None:
    """After ``step`` was committed: the store's temporary files whose owner is gone and
    files of an earlier, crashed attempt at it that the manifest does not name, then
    retention. Housekeeping never fails a committed save; a failure is an event."""
    try:
        refused = _remove_stale(place, place.folder(step), keep=committed)
        if refused:
            place.events.record(
                "checkpoint_foreign_entries_left", level=logging.WARNING, step=step,
                entries=refused, reason=f"{_NEVER_TOUCHED}; remove them by hand")
        _prune(place, step)
    except Exception as e:
        place.events.record(
            "checkpoint_prune_failed", level=logging.WARNING, step=step,
            error=f"{type(e).__name__}: {e}",
        )


_NEVER_TOUCHED = ("symlinks, FIFOs, sockets and devices in a run directory are never "
                  "followed, opened or deleted by hardtrain")


def _prune(place: Place, newest: int) -> None:
    """Delete old checkpoints beyond ``keep_last``, after ``newest`` was committed.

    Never touches ``newest`` or anything newer; checkpoints this run found damaged do not
    count towards ``keep_last`` and are set aside, not deleted (the runbook asks to keep
    them for diagnosis), and so is a symlink (or any entry but a folder) in a step
    folder's place, whatever ``keep_last``: the link is renamed, never followed. A folder
    is uncommitted (manifest removed) before its files go, so a crash mid-prune leaves
    nothing that loads half.
    """
    states = {s: place.committed(s) for s in place.steps() if s < newest}
    for step, state in states.items():
        if isinstance(state, str):
            set_aside(place, step, state)
    older = [s for s, state in states.items() if not isinstance(state, str)]
    keep: set[int] = set()
    if place.keep_last is None:
        prunable = [s for s in older if not states[s]]
    else:
        good = [s for s in older if s not in place.rejected and states[s]]
        if place.keep_last > 1:
            keep = set(good[-(place.keep_last - 1) :])
        prunable = [s for s in older if s not in keep]
    for step in prunable:
        if step in place.rejected and states[step]:
            set_aside(place, step, place.rejected[step])
        elif _delete(place, step):
            place.events.record("checkpoint_pruned", step=step)


def _delete(place: Place, step: int) -> bool:
    """Remove ``step``'s folder: its manifest first (uncommitted from then on), then our
    files in it; foreign files stay. True when it was committed. A folder that is a
    symlink, or that holds one (or a FIFO, ...) in the place of a file hardtrain would
    remove, is set aside instead: nothing is deleted through it, and it is kept."""
    folder = place.folder(step)
    committed = place.committed(step)
    if isinstance(committed, str):
        set_aside(place, step, committed)
        return False
    try:
        if committed:  # every name a manifest may hold ends as ours do
            place.storage.remove(f"{folder}/{MANIFEST}")
            place.storage.sync_dir(folder)
        refused = _remove_stale(place, folder, keep=set())
    except NotRegularFileError as e:
        refused = [str(e)]
    if refused:
        set_aside(place, step, f"holds {'; '.join(refused)} ({_NEVER_TOUCHED})")
        return False
    place.storage.rmdir(folder)
    return committed


def remove_uncommitted(place: Place, step: int) -> None:
    """What a failed attempt at ``step`` left (it has no manifest): every rank's files."""
    if not place.manifest_exists(step):
        _delete(place, step)


def drop_for_space(place: Place, failing: int) -> int | None:
    """The storage is full while saving ``failing``: delete the oldest committed
    checkpoint older than the newest one that verifies (which is never dropped, nor
    anything newer, nor a damaged one: those are set aside, never deleted). Returns the
    step dropped, or None when there is nothing left to drop; an event either way."""
    newest = latest(place)
    candidates = [s for s in place.steps() if newest is not None and s < newest.step
                  and s not in place.rejected and place.committed(s) is True]
    if not candidates:
        place.events.record(
            "checkpoint_room_exhausted", level=logging.ERROR, step=failing,
            kept=None if newest is None else newest.step,
            reason="the storage is full and no committed checkpoint older than the newest "
                   "one that verifies is left to drop")
        return None
    _delete(place, candidates[0])
    place.events.record(
        "checkpoint_dropped_for_space", level=logging.WARNING, step=candidates[0],
        saving=failing, kept=newest.step if newest else None,
        reason=f"the storage is full (saving step {failing}): the oldest committed "
               "checkpoint goes so that the newest can be written")
    return candidates[0]


def _remove_stale(place: Place, folder: str, *, keep: set[str] | None = None) -> list[str]:
    """Remove the temporary files in ``folder`` whose owner is gone (``removable``: this
    process's own, or a dead process's on this machine; never another live job's);
    with ``keep``, also every file the store may have written there (rank files, extra
    files) that ``keep`` does not name: the whole folder when pruning (``keep`` empty),
    leftovers of a crashed attempt after a commit. The manifest and foreign files stay,
    and so does what is not a regular file: returned, each with what it is."""
    refused = []
    for name in place.storage.listdir(folder) or []:
        if is_tmp_name(name):
            if not removable(name):
                continue
        elif (keep is None or name in keep or name == MANIFEST
              or not name.endswith(LOADABLE_SUFFIXES + TEXT_SUFFIXES)):
            continue
        try:
            place.storage.remove(f"{folder}/{name}")
        except FileNotFoundError:
            pass
        except NotRegularFileError as e:
            refused.append(str(e))
    return refused
