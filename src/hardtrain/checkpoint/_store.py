"""CheckpointStore: crash-safe, verified checkpoints in a local folder or any fsspec store."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from hardtrain import _dist
from hardtrain._redact import scrub
from hardtrain.checkpoint._format import (
    LOADABLE_SUFFIXES,
    MANIFEST,
    TEXT_SUFFIXES,
    Digest,
    FileEntry,
    Manifest,
    ManifestError,
    check_extra_files,
    check_step,
    check_tensors,
    compare_digests,
    decode_manifest,
    digest_of,
    encode_manifest,
    encode_state,
    is_tmp_name,
    looks_like_pickle,
    manifest_gaps,
    parse_step_dir,
    state_file,
    step_dir_name,
    tensors_file,
)
from hardtrain.checkpoint._read import TensorRead, read_json, read_tensors
from hardtrain.checkpoint._reports import (
    CheckpointFallbackWarning,
    CheckpointInfo,
    FileProblem,
    LoadedCheckpoint,
    VerifyReport,
)
from hardtrain.checkpoint._staging import StagedTensors, StagingBuffer
from hardtrain.checkpoint._storage import LocalStorage, Storage, open_storage
from hardtrain.errors import (
    CHECKPOINT_RUNBOOK,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    NoCheckpointError,
)
from hardtrain.telemetry import EventLog, EventSink

logger = logging.getLogger(__name__)

_CHECKPOINTS = "checkpoints"
_Steps = list[int]  # aliases: inside the class, `list` is the method


_Problems = list[FileProblem]


@dataclass
class _Attempt:
    loaded: LoadedCheckpoint | None = None
    problems: _Problems = field(default_factory=list)
    mismatch: str | None = None
    error: str | None = None  # something other than the checkpoint went wrong (I/O, ...)


class _Abandoned(Exception):
    """``abandon()`` was called: stop before the next stage."""


@dataclass
class _Job:
    step: int
    staged: StagedTensors
    state_json: bytes
    blocking_s: float
    files: Mapping[str, bytes] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)


class CheckpointStore:
    """Crash-safe checkpoints under ``root`` (a local path or an fsspec URL).

    ``save``/``save_async`` write ``checkpoints/step-<8 digits>/`` and commit it by writing
    ``MANIFEST.json`` last; ``load`` verifies sizes and checksums and falls back to the
    previous checkpoint when the newest is damaged. Every call first finishes the save in
    flight and raises its error if it failed: a background failure is never swallowed.

    With torch.distributed initialised, ``save``, ``save_async`` and ``load`` are
    collective: every rank must call them in the same order, with the same step. Every
    rank writes its own files into the shared step folder; rank 0 commits once every rank
    reported success, and any failure is every rank's ``CheckpointWriteError``, raised by
    the same call on every rank. ``root`` must then be storage that every rank sees (a
    shared filesystem or a bucket).

    keep_last: number of committed checkpoints to keep (>= 1), or None to keep all.
    events: where events go; by default ``<root>/events.jsonl`` for a local root, and
        the log only for a remote one.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        events: EventSink | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last={keep_last!r}: must be an int >= 1, or None to keep all")
        self.root = os.fspath(root)
        self._storage: Storage = open_storage(self.root, storage_options)
        self.keep_last = keep_last
        if events is None:
            storage = self._storage
            if isinstance(storage, LocalStorage):
                events = EventLog(os.path.join(storage.root, "events.jsonl"))
            else:
                events = EventLog(None)
        self.events = events
        self._staging = StagingBuffer()
        self._rejected: dict[int, str] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[CheckpointInfo] | None = None
        self._inflight_job: _Job | None = None
        self._group: Any = None

    # ----------------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        state: Mapping[str, Any] | None = None,
        *,
        files: Mapping[str, bytes] | None = None,
    ) -> CheckpointInfo:
        """Write and commit a checkpoint; return once it is durable.

        Collective when distributed. CPU tensors are written straight from their memory;
        GPU tensors and tensors sharing memory (tied weights) go through the staging
        buffer. Tied tensors load back as separate tensors with equal values.

        files: more files for the folder, ``{name: bytes}`` (``run.json``, a ``.patch``),
            written by this rank and verified like the rest; read them back with
            ``read_file``. No two ranks may give the same name.
        """
        self.wait()
        direct = all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in
                     tensors.values()) and not _shares_storage(tensors)
        job = self._prepare(step, tensors, state, files, stage=not direct)
        return self._persist(job)

    def save_async(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        state: Mapping[str, Any] | None = None,
        *,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        """Copy ``tensors`` into reused CPU staging buffers, then write and commit in a
        background thread. Returns once the copy is done: the caller may change the tensors.

        Waits for the previous save first. A background failure is raised by the next call
        on this store. Collective when distributed.
        """
        self.wait()
        job = self._prepare(step, tensors, state, files, stage=True)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="hardtrain-checkpoint")
        self._inflight = self._executor.submit(self._persist, job)
        self._inflight_job = job

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the save in flight is committed; raise its error if it failed.

        timeout: seconds; when the save is still being written after that, TimeoutError
        (the save stays in flight). Interrupted (Ctrl-C, a signal handler that raises),
        the save stays in flight and the next call waits for it again: two saves never
        overlap.
        """
        inflight = self._inflight
        if inflight is None:
            return None
        try:
            return inflight.result(timeout)
        finally:
            if inflight.done():
                self._inflight = self._inflight_job = None

    def abandon(self) -> CheckpointInfo | None:
        """Give up the save in flight: it stops at its next stage (before or after a file,
        before the commit), commits nothing, and earlier checkpoints stay as they were.
        Returns once its thread has stopped: the save's info if it committed anyway
        (it was past the point of no return), else None. Collective when distributed:
        the ranks' background threads agree, so every rank commits or none does.
        """
        if self._inflight_job is not None:
            self._inflight_job.cancel.set()
        try:
            return self.wait()
        except CheckpointWriteError:
            return None  # recorded as checkpoint_save_failed, the reason says "abandoned"

    @property
    def saving(self) -> bool:
        """True while a ``save_async`` is still being written (never blocks)."""
        return self._inflight is not None and not self._inflight.done()

    def close(self) -> None:
        """Finish the save in flight and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        state: Mapping[str, Any] | None,
        files: Mapping[str, bytes] | None,
        *,
        stage: bool,
    ) -> _Job:
        """Validate, stage (when asked) and clear the way for ``step``. Distributed, the
        ranks then agree (one small all-gather) before anything is written: a failure or a
        different step on any rank is every rank's error, raised here."""
        rank, world_size = _dist.rank_and_world_size()
        if world_size > 1 and self._group is None:
            self._group = _dist.new_cpu_group()
        started = time.perf_counter()
        staged, state_json, error = StagedTensors({}, []), b"", None
        try:
            check_step(step)
            check_tensors(tensors)
            check_extra_files(files or {})
            files = {name: bytes(data) for name, data in (files or {}).items()}
            state_json = encode_state(state or {})
            if stage:
                staged = self._staging.stage(tensors)
            else:
                staged = StagedTensors({k: t.contiguous() for k, t in tensors.items()}, [])
            if rank == 0:
                self._clear_way(step)
        except Exception as e:
            if world_size == 1:
                raise
            error = f"{type(e).__name__}: {e}"
        if world_size > 1:
            votes = self._gather({"step": step if isinstance(step, int) else None, "error": error,
                                  "files": sorted(files or {})})
            problems = [f"rank {r}: {v['error']}" for r, v in enumerate(votes) if v["error"]]
            names = [name for v in votes for name in v["files"]]
            if len(set(names)) != len(names):
                problems.append(f"several ranks give the same extra file ({sorted(names)})")
            if len({v["step"] for v in votes}) > 1:
                steps = ", ".join(f"rank {r} step {v['step']}" for r, v in enumerate(votes))
                problems.append(f"the ranks asked for different steps ({steps})")
            if problems:
                raise CheckpointWriteError(
                    f"step {step} not saved on any rank: " + "; ".join(problems)
                    + "; nothing was written and earlier checkpoints are untouched."
                )
        return _Job(step, staged, state_json, time.perf_counter() - started, files or {})

    def _clear_way(self, step: int) -> None:
        """Refuse to replace a committed checkpoint that verifies; set a damaged one aside
        (renamed, invisible to loading, kept for diagnosis) so that its step can be saved
        again after a fallback."""
        if not self._manifest_exists(step):
            return
        if step not in self._rejected:
            report = self.verify(step)
            if report.ok:
                raise CheckpointError(
                    f"{self._folder_path(step)} is already committed and verifies; saving step "
                    f"{step} again would replace a good checkpoint. Save a later step, or move "
                    "that folder away by hand if you really mean to replace it."
                )
            self._rejected[step] = "; ".join(map(str, report.problems))
        self._set_aside(step, self._rejected[step])

    def set_aside_after(self, step: int, reason: str) -> list[int]:
        """Set aside (rename, never delete) every checkpoint newer than ``step``, so that
        loading finds ``step`` newest and those steps can be saved again: after a rollback,
        they belong to a timeline that was abandoned. Not collective: call it on one rank
        (rank 0), then let the ranks meet before loading. Returns the steps set aside."""
        self.wait()
        newer = [s for s in self._steps() if s > step]
        for later in newer:
            self._set_aside(later, reason)
        return newer

    def _set_aside(self, step: int, reason: str) -> None:
        folder = f"{_CHECKPOINTS}/{step_dir_name(step)}"
        aside = f"{folder}.rejected-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self._storage.move(folder, aside)
        self.events.record(
            "checkpoint_set_aside", level=logging.WARNING, step=step,
            to=f"{self.root.rstrip('/')}/{aside}", reason=reason,
        )

    def _persist(self, job: _Job) -> CheckpointInfo:
        """Write this rank's files, vote, and (rank 0) commit. Runs in the background thread
        for save_async. Every rank makes the same collective calls on every path."""
        started = time.perf_counter()
        rank, world_size = _dist.rank_and_world_size()
        folder = f"{_CHECKPOINTS}/{step_dir_name(job.step)}"
        report: dict[str, Any] = {"step": job.step, "error": None, "files": []}

        def go_on() -> None:
            if job.cancel.is_set():
                raise _Abandoned("abandoned before the commit")

        try:
            go_on()
            job.staged.ready()
            self._storage.makedirs(folder)
            written: dict[str, Digest] = {}
            written[tensors_file(rank)] = self._storage.write_tensors(
                f"{folder}/{tensors_file(rank)}", job.staged.tensors
            )
            go_on()
            written[state_file(rank)] = self._storage.write_bytes(
                f"{folder}/{state_file(rank)}", job.state_json
            )
            for name, data in job.files.items():
                written[name] = self._storage.write_bytes(f"{folder}/{name}", data)
            report["files"] = [
                [name, d.num_bytes, d.checksum, list(d.chunks)] for name, d in written.items()
            ]
            self._storage.sync_dir(folder)
            go_on()
        except Exception as e:
            report["error"] = f"{type(e).__name__}: {e}"
        reports = self._gather(report)
        failed = {r: rep["error"] for r, rep in enumerate(reports) if rep["error"] is not None}
        failed.update({r: f"saved step {rep['step']}" for r, rep in enumerate(reports)
                       if rep["step"] != job.step})
        if failed:
            self._fail(job.step, "write failed on rank(s) " + ", ".join(
                f"{r} ({err})" for r, err in failed.items()
            ) + "; nothing was committed and earlier checkpoints are untouched.")
        commit_error = self._commit(job.step, world_size, reports) if rank == 0 else None
        commit_error = self._gather(commit_error)[0]
        if commit_error is not None:
            self._fail(job.step, f"writing the manifest failed ({commit_error}); the checkpoint "
                       "is not committed and earlier checkpoints are untouched.")
        self._rejected.pop(job.step, None)  # a new checkpoint: the damaged one is set aside
        if rank == 0:
            self._clean_up(job.step, {file[0] for rep in reports for file in rep["files"]})
        num_bytes = sum(file[1] for rep in reports for file in rep["files"])
        persist_s = time.perf_counter() - started
        self.events.record(
            "checkpoint_saved", step=job.step, bytes=num_bytes,
            blocking_s=round(job.blocking_s, 6), persist_s=round(persist_s, 6),
        )
        return CheckpointInfo(
            job.step, self._folder_path(job.step), True, num_bytes=num_bytes,
            world_size=world_size, blocking_s=job.blocking_s, persist_s=persist_s,
        )

    def _fail(self, step: int, reason: str) -> None:
        message = f"{self._folder_path(step)}: {reason}"
        self.events.record("checkpoint_save_failed", level=logging.ERROR, step=step, error=reason)
        raise CheckpointWriteError(message)

    def _commit(self, step: int, world_size: int, reports: list[dict[str, Any]]) -> str | None:
        """Write the manifest; None when committed, else why not (and then no manifest)."""
        path = f"{_CHECKPOINTS}/{step_dir_name(step)}/{MANIFEST}"
        files = [
            FileEntry(name, rank, Digest(num_bytes, whole, tuple(chunks)))
            for rank, rep in enumerate(reports)
            for name, num_bytes, whole, chunks in rep["files"]
        ]
        try:
            self._storage.write_bytes(path, encode_manifest(step, world_size, files))
            self._storage.sync_dir(path.rsplit("/", 1)[0])
        except Exception as e:
            with contextlib.suppress(OSError):  # renamed but not durable: undo the commit
                self._storage.remove(path)
            return f"{type(e).__name__}: {e}"
        return None

    def _clean_up(self, step: int, committed: set[str]) -> None:
        """After a commit: the store's temporary files and files of an earlier, crashed
        attempt at this step that the manifest does not name, then retention.
        Housekeeping never fails a committed save; a failure is an event."""
        try:
            self._remove_stale(f"{_CHECKPOINTS}/{step_dir_name(step)}", keep=committed)
            self._prune(step)
        except Exception as e:
            self.events.record(
                "checkpoint_prune_failed", level=logging.WARNING, step=step,
                error=f"{type(e).__name__}: {e}",
            )

    def _gather(self, obj: Any) -> list[Any]:
        if self._group is None or not _dist.is_distributed():
            return [obj]
        return _dist.all_gather_json(obj, self._group)

    # ------------------------------------------------------------------------ retention

    def _prune(self, newest: int) -> None:
        """Delete old checkpoints beyond ``keep_last``, after ``newest`` was committed.

        Never touches ``newest`` or anything newer; known-bad checkpoints do not count
        towards ``keep_last``. A folder is uncommitted (manifest removed) before its files
        go, so a crash mid-prune leaves nothing that loads half.
        """
        older = [s for s in self._steps() if s < newest]
        keep: set[int] = set()
        if self.keep_last is None:
            prunable = [s for s in older if not self._manifest_exists(s)]
        else:
            good = [s for s in older if s not in self._rejected and self._manifest_exists(s)]
            if self.keep_last > 1:
                keep = set(good[-(self.keep_last - 1) :])
            prunable = [s for s in older if s not in keep]
        for step in prunable:
            folder = f"{_CHECKPOINTS}/{step_dir_name(step)}"
            if self._manifest_exists(step):  # every name a manifest may hold ends as ours do
                self._storage.remove(f"{folder}/{MANIFEST}")
                self._storage.sync_dir(folder)
                self.events.record("checkpoint_pruned", step=step)
            self._remove_stale(folder, keep=set())
            self._storage.rmdir(folder)

    def _remove_stale(self, folder: str, *, keep: set[str] | None = None) -> None:
        """Remove the store's temporary files in ``folder``; with ``keep``, also every file
        the store may have written there (rank files, extra files) that ``keep`` does not
        name: the whole folder when pruning (``keep`` empty), leftovers of a crashed
        attempt after a commit. The manifest and foreign files stay."""
        for name in self._storage.listdir(folder) or []:
            ours = name != MANIFEST and name.endswith(LOADABLE_SUFFIXES + TEXT_SUFFIXES)
            if is_tmp_name(name) or (keep is not None and ours and name not in keep):
                with contextlib.suppress(FileNotFoundError):
                    self._storage.remove(f"{folder}/{name}")

    # ---------------------------------------------------------------------- inspection

    def list(self, *, include_uncommitted: bool = False) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first, as their manifests describe them."""
        self.wait()
        infos = []
        for step in self._steps():
            path = self._folder_path(step)
            try:
                manifest = self._read_manifest(step)
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

    def verify(self, step: int) -> VerifyReport:
        """Check every file of ``step`` (all ranks) against its manifest."""
        self.wait()
        problems: _Problems = []
        num_files = 0
        manifest: Manifest | None = None
        try:
            manifest = self._read_manifest(step)
        except FileNotFoundError:
            problems.append(FileProblem(MANIFEST, "not committed", "no manifest in the folder"))
        except ManifestError as e:
            problems.append(FileProblem(MANIFEST, "manifest", str(e)))
        else:
            problems += [FileProblem(*gap) for gap in manifest_gaps(manifest)]
            for entry in manifest.files.values():
                num_files += 1
                problem = self._check_file(step, entry, manifest.chunk_bytes)
                if problem is not None:
                    problems.append(problem)
        named = set(manifest.files) if manifest is not None else set()
        return VerifyReport(
            step, self._folder_path(step), tuple(problems), self._ignored(step, named), num_files
        )

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint whose every file verifies, or None.

        Damaged ones on the way are rejected for the rest of this run, with a warning.
        """
        for info in reversed(self.list()):
            if info.step in self._rejected:
                continue
            report = self.verify(info.step)
            if report.ok:
                return info
            self._reject(info.step, report.problems, report.problems[0].file)
        return None

    def read_file(self, step: int, name: str) -> bytes:
        """One file of a committed checkpoint (``run.json``, ``git-diff.patch``, ...),
        verified against the manifest. Not collective.

        NoCheckpointError: ``step`` is not committed. FileNotFoundError: the manifest does
        not name ``name``. CheckpointCorruptError: the manifest or the file is damaged.
        """
        self.wait()
        check_step(step)
        folder = self._folder_path(step)
        try:
            manifest = self._read_manifest(step)
        except FileNotFoundError:
            raise NoCheckpointError(f"no committed checkpoint at {folder}") from None
        except ManifestError as e:
            raise CheckpointCorruptError(f"{folder}/{MANIFEST} {e}") from None
        entry = manifest.files.get(name)
        if entry is None:
            raise FileNotFoundError(f"{folder} holds no {name} (its manifest does not name it)")
        data = b""

        def read(view: memoryview) -> str | None:
            nonlocal data
            data = bytes(view)
            return compare_digests(digest_of(data), entry.digest, manifest.chunk_bytes)

        problem = self._check_file(step, entry, manifest.chunk_bytes, read)
        if problem is not None:
            raise CheckpointCorruptError(f"{folder}: {problem}")
        return data

    # ----------------------------------------------------------------------------- load

    def load(
        self,
        step: int | None = None,
        *,
        out: Mapping[str, torch.Tensor] | None = None,
        rank: int | None = None,
    ) -> LoadedCheckpoint:
        """Load this rank's tensors and state, verified.

        step: None loads the newest checkpoint that verifies on every rank, falling back
            past damaged ones (each rejected with a warning and an event); NoCheckpointError
            when none is committed, CheckpointCorruptError when every one is damaged. A
            number loads that step or raises CheckpointCorruptError.
        out: tensors to fill in place (same names, shapes and dtypes as saved). The file
            is verified, and checked against them, before any of them is touched.
        rank: read another rank's files from a single process (inspection); not collective.

        Collective when distributed and ``rank`` is None.
        """
        self.wait()
        own_rank, world_size = _dist.rank_and_world_size()
        collective = world_size > 1 and rank is None
        if collective and self._group is None:
            self._group = _dist.new_cpu_group()
        if step is not None:
            check_step(step)
        candidates, error = None, None
        if own_rank == 0 or not collective:  # rank 0 lists; every rank tries the same steps
            try:
                candidates = self._candidates(step)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        if collective:
            candidates, error = self._gather([candidates, error])[0]
        if error is not None or candidates is None:
            raise CheckpointError(f"cannot list the checkpoints under {self.root}: {error}")
        if not candidates:
            what = f"for step {step}" if step is not None else "(there is none)"
            raise NoCheckpointError(f"no committed checkpoint under {self.root} {what}.")
        read_rank, expected_world = (own_rank, world_size) if rank is None else (rank, None)
        for candidate in candidates:
            try:
                attempt = self._load_one(candidate, read_rank, expected_world, out)
            except Exception as e:  # I/O trouble, not damage: every rank must hear of it
                attempt = _Attempt(error=f"{type(e).__name__}: {e}")
            summary = {
                "error": attempt.error, "mismatch": attempt.mismatch,
                "problems": [str(p) for p in attempt.problems],
                "files": [p.file for p in attempt.problems],
            }
            summaries = self._gather(summary) if collective else [summary]
            if errors := _collect(summaries, "error", collective):
                raise CheckpointError(
                    f"loading {self._folder_path(candidate)} failed: " + "; ".join(errors)
                    + ". Nothing was rejected; fix the storage and retry."
                )
            if mismatches := _collect(summaries, "mismatch", collective):
                raise CheckpointMismatchError(
                    f"{self._folder_path(candidate)} does not fit: " + "; ".join(mismatches) + "."
                )
            problems = _collect(summaries, "problems", collective)
            if not problems and attempt.loaded is not None:
                self.events.record("checkpoint_loaded", step=candidate)
                return attempt.loaded
            if step is not None:
                raise CheckpointCorruptError(
                    f"{self._folder_path(candidate)} failed verification: "
                    + "; ".join(problems)
                    + ". Load another step, or call load() to fall back to the newest good one."
                )
            self._reject(candidate, problems, next(iter(_collect(summaries, "files", False)), None))
        rejected = "; ".join(f"{step_dir_name(s)}: {r}" for s, r in sorted(self._rejected.items()))
        raise CheckpointCorruptError(
            f"every committed checkpoint under {self.root}/{_CHECKPOINTS} failed verification "
            f"({rejected}). Restore one from a backup; to start over on purpose, move them "
            "away first."
        )

    def _candidates(self, step: int | None) -> _Steps:
        """Committed steps to try, newest first: all not yet rejected, or just ``step``."""
        if step is not None:
            return [step] if self._manifest_exists(step) else []
        return [
            s for s in reversed(self._steps())
            if s not in self._rejected and self._manifest_exists(s)
        ]

    def _load_one(
        self,
        step: int,
        rank: int,
        world_size: int | None,
        out: Mapping[str, torch.Tensor] | None,
    ) -> _Attempt:
        """Verify and read one rank's files of one step."""
        try:
            manifest = self._read_manifest(step)
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

        def read_state(view: memoryview) -> str | None:
            value, bad = read_json(view, state_entry.digest.chunks, manifest.chunk_bytes)
            state.update(value or {})
            return bad

        def read_own_tensors(view: memoryview) -> str | None:
            nonlocal read
            read = read_tensors(view, tensor_entry.digest.chunks, manifest.chunk_bytes, out)
            return read.problem

        readers = {state_entry.name: read_state, tensor_entry.name: read_own_tensors}
        own = sorted((e for e in manifest.files.values() if e.rank == rank), key=lambda e: e.name)
        for entry in own:  # every file of this rank is verified; the two known ones are read
            problem = self._check_file(step, entry, manifest.chunk_bytes, readers.get(entry.name))
            if problem is not None:
                return _Attempt(problems=[problem])
            if read.mismatch:
                return _Attempt(mismatch="; ".join(read.mismatch))
        return _Attempt(LoadedCheckpoint(step, read.tensors, state, self._folder_path(step)))

    # ---------------------------------------------------------------------------- parts

    def _check_file(
        self,
        step: int,
        entry: FileEntry,
        chunk_bytes: int,
        read: Callable[[memoryview], str | None] | None = None,
    ) -> FileProblem | None:
        """Check one file's size, then its checksums: through ``read`` (which verifies
        while it reads and returns the checksum problem) or on their own."""
        path = f"{_CHECKPOINTS}/{step_dir_name(step)}/{entry.name}"
        try:
            size = self._storage.size(path)
            if size is None:
                return FileProblem(entry.name, "missing", "the manifest names it")
            if size != entry.num_bytes:
                hint = " (truncated?)" if size < entry.num_bytes else ""
                return FileProblem(
                    entry.name, "wrong size",
                    f"{size} bytes, manifest says {entry.num_bytes}{hint}",
                )
            if read is None:
                bad = compare_digests(self._storage.digest(path), entry.digest, chunk_bytes)
            else:
                with self._storage.read(path) as view:
                    bad = read(view)
            if bad is not None:
                return FileProblem(entry.name, "wrong checksum", bad)
        except (OSError, ValueError) as e:
            return FileProblem(entry.name, "unreadable", f"{type(e).__name__}: {e}")
        return None

    def _reject(self, step: int, problems: Sequence[object], file: str | None) -> None:
        self._rejected[step] = "; ".join(map(str, problems))
        message = (
            f"{self._folder_path(step)}: {self._rejected[step]}; ignoring it and falling back "
            f"to the previous checkpoint. See {CHECKPOINT_RUNBOOK}"
        )
        warnings.warn(scrub(message), CheckpointFallbackWarning, stacklevel=3)
        self.events.record(
            "checkpoint_rejected", level=logging.WARNING, step=step, file=file,
            reason=self._rejected[step],
        )

    def _read_manifest(self, step: int) -> Manifest:
        path = f"{_CHECKPOINTS}/{step_dir_name(step)}/{MANIFEST}"
        if self._storage.size(path) is None:
            raise FileNotFoundError(path)
        try:
            with self._storage.read(path) as view:
                data = bytes(view)
        except OSError as e:
            raise ManifestError(f"unreadable ({type(e).__name__}: {e})") from None
        return decode_manifest(data, step)

    def _manifest_exists(self, step: int) -> bool:
        return self._storage.size(f"{_CHECKPOINTS}/{step_dir_name(step)}/{MANIFEST}") is not None

    def _steps(self) -> _Steps:
        names = self._storage.listdir(_CHECKPOINTS) or []
        return sorted(s for s in map(parse_step_dir, names) if s is not None)

    def _ignored(self, step: int, named: set[str]) -> tuple[str, ...]:
        """Files in the folder that the manifest does not name: never loaded. A pickle
        among them is named as such, and it is never opened beyond its first bytes."""
        folder = f"{_CHECKPOINTS}/{step_dir_name(step)}"
        named = named | {MANIFEST}
        ignored = []
        for name in sorted(self._storage.listdir(folder) or []):
            if name in named or is_tmp_name(name):
                continue
            with contextlib.suppress(OSError):
                if looks_like_pickle(name, self._storage.read_head(f"{folder}/{name}", 2)):
                    name += " (pickle: never loaded)"
            ignored.append(name)
        return tuple(ignored)

    def _folder_path(self, step: int) -> str:
        return f"{self.root.rstrip('/')}/{_CHECKPOINTS}/{step_dir_name(step)}"




def _collect(summaries: Sequence[dict[str, Any]], key: str, by_rank: bool) -> list[str]:
    """The non-empty ``key`` values of every rank's summary, labelled by rank if asked."""
    found = []
    for rank, summary in enumerate(summaries):
        value = summary[key]
        for item in value if isinstance(value, list) else [value]:
            if item:
                found.append(f"rank {rank}: {item}" if by_rank else str(item))
    return found



def _shares_storage(tensors: Mapping[str, torch.Tensor]) -> bool:
    storages = [
        t.untyped_storage().data_ptr()
        for t in tensors.values()
        if t.layout == torch.strided and t.numel()
    ]
    return len(set(storages)) != len(storages)


