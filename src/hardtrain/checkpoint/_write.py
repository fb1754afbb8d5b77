"""Writing and committing a checkpoint: validate and stage (``prepare``, in the caller's
thread), then write every rank's files and commit on rank 0 (``persist``, in the caller's
thread or the background one). Also setting damaged or abandoned checkpoints aside."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from hardtrain import _dist
from hardtrain.checkpoint._format import (
    MANIFEST,
    Digest,
    FileEntry,
    check_extra_files,
    check_step,
    check_tensors,
    encode_manifest,
    encode_state,
    state_file,
    tensors_file,
)
from hardtrain.checkpoint._place import Place
from hardtrain.checkpoint._reports import CheckpointInfo
from hardtrain.checkpoint._resilience import is_full
from hardtrain.checkpoint._retention import (
    clean_up,
    drop_for_space,
    remove_uncommitted,
    set_aside,
)
from hardtrain.checkpoint._staging import StagedTensors, StagingBuffer
from hardtrain.checkpoint._verify import verify
from hardtrain.errors import CheckpointError, CheckpointStorageError, CheckpointWriteError


class _Abandoned(Exception):
    """``abandon()`` was called: stop before the next stage."""


@dataclass
class Job:
    """One save, prepared and agreed on by every rank; ``persist`` writes it."""

    step: int
    staged: StagedTensors
    state_json: bytes
    blocking_s: float
    files: Mapping[str, bytes] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    group: Any = None  # the store's group, got where every rank was; None: one process


def must_stage(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a blocking save copies ``tensors`` through the staging buffer: GPU tensors
    and tensors sharing memory (tied weights) do; other CPU tensors are written as they are."""
    on_cpu = all(
        isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors.values()
    )
    return not on_cpu or _shares_storage(tensors)


def prepare(
    place: Place,
    staging: StagingBuffer,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, Any] | None,
    files: Mapping[str, bytes] | None,
    *,
    stage: bool,
) -> Job:
    """Validate, stage (when asked) and clear the way for ``step``. Collective when
    distributed: the ranks then agree (one small all-gather) before anything is written,
    and a failure or a different step on any rank is every rank's error, raised here."""
    rank, world_size = _dist.rank_and_world_size()
    group = place.group()
    started = time.perf_counter()
    staged, state_json, error, storage = StagedTensors({}, []), b"", None, False
    try:
        check_step(step)
        check_tensors(tensors)
        check_extra_files(files or {})
        files = {name: bytes(data) for name, data in (files or {}).items()}
        state_json = encode_state(state or {})
        if stage:
            staged = staging.stage(tensors)
        else:
            staged = StagedTensors({k: t.contiguous() for k, t in tensors.items()}, [])
        if rank == 0:
            _clear_way(place, step)
    except Exception as e:
        if world_size == 1:
            raise
        error = f"{type(e).__name__}: {e}"
        storage = isinstance(e, CheckpointStorageError)
    if world_size > 1:
        votes = _dist.all_gather_json({"step": step if isinstance(step, int) else None,
                                       "error": error, "storage": storage,
                                       "files": sorted(files or {})}, group)
        problems = [f"rank {r}: {v['error']}" for r, v in enumerate(votes) if v["error"]]
        names = [name for v in votes for name in v["files"]]
        if len(set(names)) != len(names):
            problems.append(f"several ranks give the same extra file ({sorted(names)})")
        if len({v["step"] for v in votes}) > 1:
            steps = ", ".join(f"rank {r} step {v['step']}" for r, v in enumerate(votes))
            problems.append(f"the ranks asked for different steps ({steps})")
        if problems:
            failure = (CheckpointStorageError if any(v["storage"] for v in votes)
                       else CheckpointWriteError)
            raise failure(
                f"step {step} not saved on any rank: " + "; ".join(problems)
                + "; nothing was written and earlier checkpoints are untouched."
            )
    return Job(step, staged, state_json, time.perf_counter() - started, files or {},
               group=group)


def _clear_way(place: Place, step: int) -> None:
    """Refuse to replace a committed checkpoint that verifies; set a damaged one aside
    (renamed, invisible to loading, kept for diagnosis) so that its step can be saved
    again after a fallback. The storage failing meanwhile is CheckpointStorageError."""
    try:
        committed = place.manifest_exists(step)
    except Exception as e:  # OSError, or an HTTP client's own error class
        reason = (f"looking for an earlier checkpoint of step {step} failed "
                  f"({type(e).__name__}: {e}); nothing was written.")
        place.events.record("checkpoint_save_failed", level=logging.ERROR, step=step,
                            error=reason)
        raise CheckpointStorageError(f"{place.path(step)}: {reason}") from e
    if not committed:
        return
    if step not in place.rejected:
        report = verify(place, step)
        if report.ok:
            raise CheckpointError(
                f"{place.path(step)} is already committed and verifies; saving step "
                f"{step} again would replace a good checkpoint. Save a later step, or move "
                "that folder away by hand if you really mean to replace it."
            )
        place.rejected[step] = "; ".join(map(str, report.problems))
    set_aside(place, step, place.rejected[step])


def persist(place: Place, job: Job) -> CheckpointInfo:
    """Write this rank's files, vote, and (rank 0) commit. Runs in the background thread
    for save_async. Every rank makes the same collective calls on every path. A full disk
    (or quota) on any rank makes room (the oldest committed checkpoint but the newest that
    verifies goes) and the files are written again, as long as there is something to drop."""
    started = time.perf_counter()
    rank, world_size = _dist.rank_and_world_size()
    while True:
        reports = _dist.all_gather_json(_write_files(place, job, rank), job.group)
        failed = {r: rep["error"] for r, rep in enumerate(reports) if rep["error"] is not None}
        failed.update({r: f"saved step {rep['step']}" for r, rep in enumerate(reports)
                       if rep["step"] != job.step})
        if not failed:
            commit_error = _commit(place, job, world_size, reports) if rank == 0 else None
            commit_error = _dist.all_gather_json(commit_error, job.group)[0]
            if commit_error is None:
                break
            failed = {0: f"writing the manifest failed ({commit_error['error']}): the "
                         "checkpoint is not committed"}
            reports[0]["full"] = commit_error["full"]
        if not (any(rep["full"] for rep in reports) and _make_room(place, job, rank)):
            _fail(place, job.step, "write failed on rank(s) " + ", ".join(
                f"{r} ({err})" for r, err in failed.items()
            ) + "; nothing was committed and earlier checkpoints are untouched.",
                abandoned=job.cancel.is_set())
    place.rejected.pop(job.step, None)  # a new checkpoint: the damaged one is set aside
    if rank == 0:
        clean_up(place, job.step, {file[0] for rep in reports for file in rep["files"]})
    num_bytes = sum(file[1] for rep in reports for file in rep["files"])
    persist_s = time.perf_counter() - started
    place.events.record(
        "checkpoint_saved", step=job.step, bytes=num_bytes,
        blocking_s=round(job.blocking_s, 6), persist_s=round(persist_s, 6),
    )
    return CheckpointInfo(
        job.step, place.path(job.step), True, num_bytes=num_bytes,
        world_size=world_size, blocking_s=job.blocking_s, persist_s=persist_s,
    )


def _write_files(place: Place, job: Job, rank: int) -> dict[str, Any]:
    """This rank's files of ``job``, written and synced: the report every rank sends."""
    folder = place.folder(job.step)
    report: dict[str, Any] = {"step": job.step, "error": None, "full": False, "files": []}

    def go_on() -> None:
        if job.cancel.is_set():
            raise _Abandoned("abandoned before the commit")

    try:
        go_on()
        job.staged.ready()
        place.storage.makedirs(folder)
        written: dict[str, Digest] = {}
        written[tensors_file(rank)] = place.storage.write_tensors(
            f"{folder}/{tensors_file(rank)}", job.staged.tensors, go_on
        )
        go_on()
        written[state_file(rank)] = place.storage.write_bytes(
            f"{folder}/{state_file(rank)}", job.state_json
        )
        for name, data in job.files.items():
            written[name] = place.storage.write_bytes(f"{folder}/{name}", data)
        report["files"] = [
            [name, d.num_bytes, d.checksum, list(d.chunks)] for name, d in written.items()
        ]
        place.storage.sync_dir(folder)
        go_on()
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["full"] = is_full(e)
    return report


def _make_room(place: Place, job: Job, rank: int) -> bool:
    """Collective. After a full disk: rank 0 removes what this attempt wrote and drops the
    oldest committed checkpoint it may; True on every rank when one was dropped (then the
    save is tried again)."""
    dropped = None
    if rank == 0 and not job.cancel.is_set():
        remove_uncommitted(place, job.step)
        dropped = drop_for_space(place, job.step)
    return _dist.all_gather_json(dropped, job.group)[0] is not None


def _fail(place: Place, step: int, reason: str, *, abandoned: bool = False) -> NoReturn:
    """Raise the save's error; an event: ``checkpoint_save_abandoned`` when ``abandon()``
    asked for it (a preemption that saves a newer step instead), else
    ``checkpoint_save_failed``."""
    if abandoned:
        place.events.record("checkpoint_save_abandoned", level=logging.WARNING, step=step,
                            error=reason)
        raise CheckpointWriteError(f"{place.path(step)}: {reason}")
    place.events.record("checkpoint_save_failed", level=logging.ERROR, step=step,
                        error=reason)
    raise CheckpointStorageError(f"{place.path(step)}: {reason}")


def _commit(
    place: Place, job: Job, world_size: int, reports: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Write the manifest; None when committed, else why not (and then no manifest)."""
    step = job.step
    path = f"{place.folder(step)}/{MANIFEST}"
    files = [
        FileEntry(name, rank, Digest(num_bytes, whole, tuple(chunks)))
        for rank, rep in enumerate(reports)
        for name, num_bytes, whole, chunks in rep["files"]
    ]
    try:
        place.storage.write_bytes(path, encode_manifest(step, world_size, files))
        place.storage.sync_dir(path.rsplit("/", 1)[0])
    except Exception as e:
        with contextlib.suppress(OSError):  # renamed but not durable: undo the commit
            place.storage.remove(path)
        return {"error": f"{type(e).__name__}: {e}", "full": is_full(e)}
    return None


def _shares_storage(tensors: Mapping[str, torch.Tensor]) -> bool:
    storages = [
        t.untyped_storage().data_ptr()
        for t in tensors.values()
        if t.layout == torch.strided and t.numel()
    ]
    return len(set(storages)) != len(storages)
