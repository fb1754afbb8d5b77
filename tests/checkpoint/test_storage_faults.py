"""Storage faults never kill a healthy run: transient errors are retried, a full disk makes
room, a save that still fails leaves training going until ``max_unsaved``, and storage
that cannot be used at all stops ``fit`` before its first step.

Faults come from a seam around the real storage (``Faults``), keyed by operation, path and
attempt; the full disk is a real small tmpfs where one can be mounted (root), else a byte
budget in the seam.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht
from hardtrain.checkpoint import _store
from hardtrain.checkpoint._resilience import is_full, is_transient
from hardtrain.checkpoint._storage import Storage, never_stop
from tests.checkpoint import test_fsspec
from tests.trainer.test_trainer import FakeClock, make

s3_endpoint = test_fsspec.s3_endpoint  # the S3-compatible server on loopback (a fixture)

# ------------------------------------------------------------------------- the fault seam

Rule = Callable[[str, str, int], BaseException | None]  # (operation, path, attempt) -> error


class Faults:
    """Wraps a Storage; before each operation, ``rule(op, path, attempt)`` may return an
    error to raise instead (attempt counts calls of that op on that path, from 1)."""

    def __init__(self, inner: Storage, rule: Rule) -> None:
        self.inner, self.rule = inner, rule
        self.attempts: dict[tuple[str, str], int] = {}

    def _check(self, op: str, path: str) -> None:
        key = (op, path)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        error = self.rule(op, path, self.attempts[key])
        if error is not None:
            raise error

    def write_tensors(self, path: str, tensors: Mapping[str, torch.Tensor],
                      check: Callable[[], None] = never_stop) -> Any:
        self._check("write", path)
        return self.inner.write_tensors(path, tensors, check)

    def write_bytes(self, path: str, data: bytes) -> Any:
        self._check("write", path)
        return self.inner.write_bytes(path, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Callable[[Rule], list[Faults]]:
    """``faults(rule)``: every store opened from then on goes through the seam."""
    opened: list[Faults] = []

    def install(rule: Rule) -> list[Faults]:
        real = _store.open_storage

        def open_faulty(root: str, options: Any = None) -> Storage:
            seam = Faults(real(root, options), rule)
            opened.append(seam)
            return seam  # type: ignore[return-value]

        monkeypatch.setattr(_store, "open_storage", open_faulty)
        return opened

    return install


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    import json

    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


# --------------------------------------------------------------------- classification


class ClientError(Exception):
    """Shaped like botocore's: a ``response`` with the error code and HTTP status."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def wrapped(cause: BaseException) -> OSError:
    """As s3fs raises it: an OSError whose cause is the client's error."""
    error = OSError(errno.EIO, str(cause))
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(("error", "transient", "full"), [
    (ConnectionResetError(errno.ECONNRESET, "reset"), True, False),
    (TimeoutError("read timed out"), True, False),
    (OSError(errno.ETIMEDOUT, "timed out"), True, False),
    (wrapped(ClientError("SlowDown", 503)), True, False),
    (wrapped(ClientError("InternalError", 500)), True, False),
    (wrapped(ClientError("TooManyRequests", 429)), True, False),
    (OSError(errno.ENOSPC, "No space left on device"), False, True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), False, True),
    (wrapped(ClientError("XMinioStorageFull", 507)), False, True),
    (PermissionError(errno.EACCES, "denied"), False, False),
    (FileNotFoundError(errno.ENOENT, "no such bucket"), False, False),
    (OSError(errno.EIO, "Input/output error"), False, False),  # a disk error, not a blip
    (wrapped(ClientError("InvalidBucketName", 400)), False, False),
])
def test_errors_are_told_apart(error: BaseException, transient: bool, full: bool) -> None:
    assert is_transient(error) is transient
    assert is_full(error) is full


# ------------------------------------------------------------------------- the store


def test_transient_errors_are_retried_and_the_save_commits(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    def rule(op: str, path: str, attempt: int) -> BaseException | None:
        if op == "write" and path.endswith("rank-00000.safetensors") and attempt <= 2:
            return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return None

    faults(rule)
    store = ht.CheckpointStore(tmp_path, retry_for="30s")
    store.save(1, {"w": torch.ones(3)})
    assert store.verify(1).ok
    retried = [r for r in store.events.records if r["event"] == "storage_retried"]
    assert [r["attempt"] for r in retried] == [1, 2]
    assert all("ConnectionResetError" in r["error"] and r["op"] == "write" for r in retried)
    assert retried[0]["path"].endswith("step-00000001/rank-00000.safetensors")


def test_a_persistent_failure_is_a_storage_error_after_the_retries(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    faults(lambda op, path, attempt: TimeoutError("timed out") if op == "write" else None)
    store = ht.CheckpointStore(tmp_path, retry_for=0.3)
    with pytest.raises(ht.CheckpointStorageError, match="nothing was committed") as raised:
        store.save(1, {"w": torch.ones(3)})
    assert isinstance(raised.value, ht.CheckpointWriteError)
    assert "runbooks/storage-errors.md" in str(raised.value)
    assert store.list() == []


def test_errors_that_are_not_transient_are_not_retried(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    faults(lambda op, path, attempt: PermissionError(errno.EACCES, "denied")
           if op == "write" else None)
    store = ht.CheckpointStore(tmp_path, retry_for="1h")
    with pytest.raises(ht.CheckpointStorageError, match="PermissionError"):
        store.save(1, {"w": torch.ones(3)})
    assert not [r for r in store.events.records if r["event"] == "storage_retried"]


def test_a_full_disk_drops_the_oldest_checkpoints_but_never_the_newest_good_one(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    """The seam says "full" while three checkpoints are committed."""
    store: ht.CheckpointStore | None = None

    def rule(op: str, path: str, attempt: int) -> BaseException | None:
        if op == "write" and store is not None and len(store.list()) >= 3:
            return OSError(errno.ENOSPC, "No space left on device")
        return None

    faults(rule)
    store = ht.CheckpointStore(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        store.save(step, {"w": torch.full((3,), float(step))})
    store.save(4, {"w": torch.full((3,), 4.0)})  # 1 goes, then it fits
    assert [i.step for i in store.list()] == [2, 3, 4]
    [dropped] = [r for r in store.events.records if r["event"] == "checkpoint_dropped_for_space"]
    assert dropped["step"] == 1 and dropped["saving"] == 4 and dropped["kept"] == 3
    assert not list((tmp_path / "checkpoints").glob("step-00000001*"))


def test_a_full_disk_with_nothing_left_to_drop_fails_and_keeps_the_newest(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    faults(lambda op, path, attempt: OSError(errno.ENOSPC, "No space left on device")
           if op == "write" and "step-00000002" in path else None)
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(3)})
    with pytest.raises(ht.CheckpointStorageError, match="No space left"):
        store.save(2, {"w": torch.ones(3)})
    assert [i.step for i in store.list()] == [1] and store.verify(1).ok
    [exhausted] = [r for r in store.events.records if r["event"] == "checkpoint_room_exhausted"]
    assert exhausted["kept"] == 1
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()  # leftovers removed


# ----------------------------------------------------------------------- the trainer


def test_failing_saves_do_not_stop_training_until_max_unsaved(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    """Saves from step 6 on fail (storage down); training goes on. With the clock past
    max_unsaved, the run stops with an error naming the checkpoint a restart resumes
    from; once the storage is back, the restart ends bit-exact with a run never troubled."""
    broken = {"on": True}

    def rule(op: str, path: str, attempt: int) -> BaseException | None:
        down = broken["on"] and op == "write" and any(
            f"step-{s:08d}" in path for s in range(6, 100))
        return OSError(errno.EIO, "Input/output error") if down else None

    faults(rule)
    clock = FakeClock()
    policy = ht.CheckpointPolicy(every=None, every_steps=2, async_save=False,
                                 max_unsaved="1h", retry_for=0)
    trainer, step = make(tmp_path / "run", policy=policy, clock=clock, metadata=None)

    def step_fn(batch: Any) -> Any:
        clock.now += 600.0  # ten minutes a step
        return step(batch)

    with pytest.raises(ht.CheckpointStorageError) as raised:
        trainer.fit(step_fn, max_steps=30)
    message = str(raised.value)
    assert "no checkpoint has committed for" in message and "max_unsaved=3600 s" in message
    assert "a restart resumes from step 4" in message and "Input/output error" in message
    run = tmp_path / "run"
    assert [e["step"] for e in events(run, "checkpoint_save_failed")] == [6, 8, 10]
    [stopped] = events(run, "checkpoint_unsaved_too_long")
    assert stopped["checkpoint_step"] == 4 and stopped["step"] == 11  # 4200 s > 3600 s
    store = ht.CheckpointStore(run)
    assert [i.step for i in store.list()] == [2, 4] and all(
        store.verify(i.step).ok for i in store.list())

    broken["on"] = False
    again, step = make(run, policy=policy, clock=FakeClock(), metadata=None)
    assert again.fit(step, max_steps=30).resumed_from == 4
    straight, step = make(tmp_path / "straight", policy=policy, metadata=None)
    straight.fit(step, max_steps=30)
    for (name, a), b in zip(again.model.state_dict().items(),
                            straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_final_save_reports_its_failure(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    faults(lambda op, path, attempt: OSError(errno.EIO, "Input/output error")
           if op == "write" and "step-00000008" in path else None)
    policy = ht.CheckpointPolicy(every=None, every_steps=4, retry_for=0)
    trainer, step = make(tmp_path, policy=policy, metadata=None)
    with pytest.raises(ht.CheckpointStorageError, match="step-00000008"):
        trainer.fit(step, max_steps=8)
    assert [i.step for i in ht.CheckpointStore(tmp_path).list()] == [4]


def test_storage_that_cannot_be_written_stops_fit_before_its_first_step(
    tmp_path: Path, faults: Callable[[Rule], list[Faults]]
) -> None:
    faults(lambda op, path, attempt: PermissionError(errno.EACCES, "Permission denied")
           if op == "write" else None)
    trainer, step = make(tmp_path, metadata=None)
    seen: list[int] = []
    with pytest.raises(ht.CheckpointStorageError) as raised:
        trainer.fit(lambda batch: seen.append(1) or step(batch), max_steps=4)
    message = str(raised.value)
    assert str(tmp_path) in message and "PermissionError" in message
    assert "credentials and the permissions" in message and "Nothing was trained" in message
    assert seen == []


# ------------------------------------------------------------------ a real full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 320 KiB tmpfs (root can mount one), else skip: the seam tests above cover it."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_run_on_a_full_disk_finishes_with_its_final_checkpoint(small_disk: Path) -> None:
    """Checkpoints of ~130 KiB, keep_last=3, on 320 KiB: the third does not fit until
    the oldest goes. Before, the run died with ENOSPC and a restart died again."""
    run = small_disk / "run"
    policy = ht.CheckpointPolicy(every=None, every_steps=2, keep_last=3, retry_for=0)
    trainer, step = make(run, hidden=900, policy=policy, metadata=None)
    assert trainer.fit(step, max_steps=12).step == 12
    store = ht.CheckpointStore(run)
    infos = store.list()
    assert infos[-1].step == 12 and all(store.verify(i.step).ok for i in infos)
    assert events(run, "checkpoint_dropped_for_space"), "the disk never filled up"
    assert not events(run, "checkpoint_save_failed")


# ----------------------------------------------------------------------------- S3


def test_a_bucket_that_does_not_exist_fails_before_the_first_step(
    s3_endpoint: str, tmp_path: Path
) -> None:
    import s3fs

    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    bucket = f"hardtrain-missing-{uuid.uuid4().hex[:12]}"
    trainer, step = make(f"s3://{bucket}/run", metadata=None, storage_options=options,
                         log_dir=str(tmp_path / "logs"))
    seen: list[int] = []
    with pytest.raises(ht.CheckpointStorageError, match="bucket does not exist") as raised:
        trainer.fit(lambda batch: seen.append(1) or step(batch), max_steps=4)
    assert f"s3://{bucket}/run" in str(raised.value) and seen == []
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    assert not fs.exists(bucket)  # never created


class Outage:
    """A TCP proxy on loopback in front of the S3 server that can drop every connection
    (existing ones reset, new ones closed at once) until it is restored."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.down = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                self._reset(client)
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def cut(self) -> None:
        self.down.set()
        with self._lock:
            for sock in self._open:
                self._reset(sock)
            self._open.clear()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_an_s3_outage_mid_run_is_ridden_out(s3_endpoint: str, tmp_path: Path) -> None:
    """The server is unreachable from step 5 to step 9: those saves fail after their
    retries, training goes on, and the save at step 10 commits."""
    import boto3

    bucket = f"hardtrain-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket=bucket)
    outage = Outage(s3_endpoint)
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": outage.url, "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1,
                                 "read_timeout": 2}}
    policy = ht.CheckpointPolicy(every=None, every_steps=2, async_save=False, retry_for=1)
    logs = tmp_path / "logs"
    trainer, step = make(f"s3://{bucket}/run", policy=policy, metadata=None,
                         storage_options=options, log_dir=str(logs))

    def step_fn(batch: Any) -> Any:
        if trainer.step == 5:
            outage.cut()
        elif trainer.step == 9:
            outage.restore()
        return step(batch)

    try:
        assert trainer.fit(step_fn, max_steps=12).step == 12
    finally:
        outage.close()
    failed = [e["step"] for e in events(logs, "checkpoint_save_failed")]
    assert failed == [6, 8]
    assert events(logs, "storage_retried")
    store = ht.CheckpointStore(f"s3://{bucket}/run", storage_options={
        **options, "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}})
    steps = [i.step for i in store.list()]
    assert 10 in steps and steps[-1] == 12 and all(store.verify(s).ok for s in steps)
