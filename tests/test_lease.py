"""The run directory's lease (``hardtrain._lease``, ``_features/lease.py``): one job at a
time writes a run directory.

Unit tests of the lease on a local folder and on ``memory://`` (and on the moto S3
server): acquire, renew, release; a live holder is refused; a dead pid, a reused pid or
an earlier fit of this process is taken over at once; a lease from another host is taken
over once its heartbeat has not advanced for one of its periods, and never while it
advances. Then the trainer: a refused fit writes nothing; the lease goes on every exit;
a lease lost during the run stops it without saving; renewal errors do not stop it; two
ranks refuse together. Then real jobs: a second job on a live job's run directory exits
before its first step, and after the first is SIGKILLed a restart takes the lease over
and ends bit for bit like an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hardtrain as ht
from hardtrain import _lease
from hardtrain._features import lease as lease_feature
from hardtrain._lease import LEASE_FILE, Lease, LeaseRecord, watch_s
from hardtrain.checkpoint._storage import Storage, open_storage
from tests.checkpoint.test_fsspec import S3Run, s3, s3_endpoint  # noqa: F401 (fixtures)
from tests.trainer.compare import assert_same_run, events, losses

pytestmark = pytest.mark.timeout(180)
JOB = Path(__file__).with_name("lease_job.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
OTHER_HOST = "gpu-node-17.example"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(params=["local", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A run directory: a local folder, or a place of its own in the memory filesystem."""
    if request.param == "local":
        yield str(tmp_path / "run")
        return
    top = f"hardtrain-lease-{uuid.uuid4().hex}"
    yield f"memory://{top}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{top}"):
        fs.rm(f"/{top}", recursive=True)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of this host that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def read_lease(storage: Storage) -> LeaseRecord | None:
    try:
        with storage.read(LEASE_FILE) as view:
            return LeaseRecord.decode(bytes(view))
    except FileNotFoundError:
        return None


def record(**changes: Any) -> LeaseRecord:
    """A lease as another job would write it: by default this host, a pid nobody has."""
    now = time.time()
    fields: dict[str, Any] = dict(
        host=socket.gethostname(), machine=_lease.boot_and_namespace(), pid=2**22 + 7,
        process_started_at=now - 100, job_started_at=now - 90, token=uuid.uuid4().hex,
        beat=12, beat_at=now - 5, heartbeat_s=60.0)
    return LeaseRecord(**{**fields, **changes})


def held_by(proc: subprocess.Popen[bytes], **changes: Any) -> LeaseRecord:
    started = psutil.Process(proc.pid).create_time()
    return record(pid=proc.pid, process_started_at=started, **changes)


def write(storage: Storage, lease: LeaseRecord) -> None:
    storage.makedirs("")
    storage.write_bytes(LEASE_FILE, lease.encode())


def wait_for(what: Callable[[], bool], timeout_s: float = 20.0, why: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {why or what}"
        time.sleep(0.01)


def event_names(run_dir: Path) -> list[str]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- the lease


def test_acquire_renew_release(url: str) -> None:
    storage = open_storage(url)
    lease = Lease(storage, 0.2, where=url)
    assert lease.acquire() is None
    first = read_lease(storage)
    assert first is not None and first == lease.record
    assert (first.host, first.pid, first.beat, first.heartbeat_s) == (
        socket.gethostname(), os.getpid(), 0, 0.2)
    assert first.process_started_at == psutil.Process().create_time()

    assert lease.renew() == ("renewed", None)
    assert lease.renew() == ("renewed", None)
    again = read_lease(storage)
    assert again is not None and again.token == first.token and again.beat == 2

    assert lease.release() is True
    assert read_lease(storage) is None and storage.size(LEASE_FILE) is None
    assert lease.release() is False  # not held any more


def test_a_live_holder_on_this_host_is_refused_at_once(
        url: str, sleeper: subprocess.Popen[bytes]) -> None:
    storage = open_storage(url)
    theirs = held_by(sleeper)  # heartbeat 60 s: a watch would show in the time taken
    write(storage, theirs)
    started = time.monotonic()
    with pytest.raises(ht.RunDirInUseError) as refused:
        Lease(storage, 0.2, where=url).acquire()
    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert f"pid {sleeper.pid} on host {socket.gethostname()}" in message
    assert "last heartbeat #12" in message and "is running" in message
    assert "new run_dir" in message and "runbooks/storage-errors.md" in message
    assert refused.value.holder == theirs.public()
    assert refused.value.runbook == "runbooks/storage-errors.md"
    assert read_lease(storage) == theirs  # untouched


def test_another_fit_of_this_process_on_the_same_run_dir_is_refused(url: str) -> None:
    storage = open_storage(url)
    first = Lease(storage, 0.2, where=url)
    first.acquire()
    with pytest.raises(ht.RunDirInUseError, match="this process holds it"):
        Lease(storage, 0.2, where=url).acquire()
    first.release()


def test_a_lease_of_a_dead_pid_is_taken_over_at_once(
        url: str, sleeper: subprocess.Popen[bytes]) -> None:
    storage = open_storage(url)
    theirs = held_by(sleeper)
    write(storage, theirs)
    sleeper.kill()
    sleeper.wait()
    started = time.monotonic()
    lease = Lease(storage, 0.2, where=url)
    taken = lease.acquire()
    assert time.monotonic() - started < 10  # no watch of its 60 s heartbeat
    assert taken is not None and taken.previous == theirs
    assert taken.reason == f"pid {sleeper.pid} is not running"
    assert read_lease(storage) == lease.record
    lease.release()


def test_a_reused_pid_is_taken_over_at_once(url: str, sleeper: subprocess.Popen[bytes]) -> None:
    """The pid runs, but it is another process than the one that wrote the lease."""
    storage = open_storage(url)
    theirs = held_by(sleeper)
    write(storage, replace(theirs, process_started_at=theirs.process_started_at - 1000))
    lease = Lease(storage, 0.2, where=url)
    taken = lease.acquire()
    assert taken is not None and f"pid {sleeper.pid} is now another process" in taken.reason
    lease.release()


def test_a_lease_an_earlier_fit_of_this_process_left_is_taken_over(url: str) -> None:
    storage = open_storage(url)
    write(storage, record(pid=os.getpid(), process_started_at=psutil.Process().create_time()))
    lease = Lease(storage, 0.2, where=url)
    taken = lease.acquire()
    assert taken is not None and taken.reason == "an earlier fit of this process left it behind"
    lease.release()


def test_a_lease_of_a_killed_process_is_taken_over_at_once(tmp_path: Path) -> None:
    """The lease as another process really wrote it, then SIGKILL."""
    run_dir = tmp_path / "run"
    code = ("import sys, time; from hardtrain._lease import Lease; "
            "from hardtrain.checkpoint._storage import open_storage; "
            f"Lease(open_storage({str(run_dir)!r}), 60.0, where='x').acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=ENV)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        with pytest.raises(ht.RunDirInUseError, match=f"pid {proc.pid} is running"):
            Lease(open_storage(str(run_dir)), 60.0, where="x").acquire()
    finally:
        proc.kill()
        proc.wait()
    lease = Lease(open_storage(str(run_dir)), 60.0, where="x")
    started = time.monotonic()
    taken = lease.acquire()
    assert time.monotonic() - started < 10
    assert taken is not None and taken.previous is not None and taken.previous.pid == proc.pid
    assert taken.reason == f"pid {proc.pid} is not running"
    lease.release()


def test_a_stale_lease_from_another_host_is_taken_over_after_one_heartbeat(url: str) -> None:
    storage = open_storage(url)
    theirs = record(host=OTHER_HOST, machine="another-boot/pid:[1]", heartbeat_s=0.2)
    write(storage, theirs)
    lease = Lease(storage, 30.0, where=url)  # its holder's period counts, not ours
    started = time.monotonic()
    taken = lease.acquire()
    waited = time.monotonic() - started
    assert watch_s(0.2) <= waited < watch_s(0.2) + 5
    assert taken is not None and taken.previous == theirs
    assert taken.reason.startswith("it is held from another host, and its heartbeat did not "
                                   "advance in")
    assert read_lease(storage) == lease.record
    lease.release()


def test_an_unreadable_lease_is_taken_over_after_one_heartbeat(url: str) -> None:
    storage = open_storage(url)
    storage.makedirs("")
    storage.write_bytes(LEASE_FILE, b'{"host": "half a lea')
    lease = Lease(storage, 0.2, where=url)
    taken = lease.acquire()
    assert taken is not None and taken.previous is None
    assert taken.reason.startswith("its lease file does not parse, and its heartbeat did not")
    lease.release()


def test_a_lease_whose_heartbeat_advances_is_never_taken_over(url: str) -> None:
    """The watch reads the lease between waits; the holder renews in every wait."""
    storage = open_storage(url)
    theirs = record(host=OTHER_HOST, machine=None, heartbeat_s=0.2)
    write(storage, theirs)

    def holder_renews(seconds: float) -> None:
        now = read_lease(storage)
        assert now is not None
        write(storage, replace(now, beat=now.beat + 1))

    for _ in range(3):
        with pytest.raises(ht.RunDirInUseError) as refused:
            Lease(storage, 0.2, where=url, sleep=holder_renews).acquire()
        assert "its heartbeat advanced while this job watched" in str(refused.value)
        assert f"pid {theirs.pid} on host {OTHER_HOST}" in str(refused.value)
    now = read_lease(storage)
    assert now is not None and now.token == theirs.token and now.beat == theirs.beat + 3


def test_the_holders_heartbeat_period_is_watched_not_ours(tmp_path: Path) -> None:
    """A holder renewing every 1.5 s (its heartbeat: 2 s) is alive for a job whose own
    heartbeat is 0.05 s (whose own period plus margin would be over in about 1.1 s)."""
    storage = open_storage(str(tmp_path / "run"))
    theirs = record(host=OTHER_HOST, machine=None, heartbeat_s=2.0)
    write(storage, theirs)
    stop = threading.Event()

    def holder() -> None:
        beat = theirs.beat
        while not stop.wait(1.5):  # the other job's renewals
            beat += 1
            write(storage, replace(theirs, beat=beat))

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        with pytest.raises(ht.RunDirInUseError, match="its heartbeat advanced"):
            Lease(storage, 0.05, where="run").acquire()
    finally:
        stop.set()
        thread.join()
    now = read_lease(storage)
    assert now is not None and now.token == theirs.token


def test_a_lease_released_while_watched_is_taken(url: str) -> None:
    storage = open_storage(url)
    write(storage, record(host=OTHER_HOST, heartbeat_s=30.0))

    def holder_releases(seconds: float) -> None:
        storage.remove(LEASE_FILE)

    lease = Lease(storage, 0.2, where=url, sleep=holder_releases)
    assert lease.acquire() is None
    assert read_lease(storage) == lease.record
    lease.release()


class Racing:
    """A storage where another job's lease lands right after each of ours."""

    def __init__(self, storage: Storage, theirs: LeaseRecord) -> None:
        self.storage, self.theirs = storage, theirs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def write_bytes(self, path: str, data: bytes) -> Any:
        digest = self.storage.write_bytes(path, data)
        self.storage.write_bytes(path, self.theirs.encode())
        return digest


def test_of_two_jobs_writing_the_lease_at_once_the_one_overwritten_refuses(url: str) -> None:
    theirs = record(host=OTHER_HOST)
    lease = Lease(Racing(open_storage(url), theirs), 0.2, where=url)  # type: ignore[arg-type]
    with pytest.raises(ht.RunDirInUseError, match="at the same moment"):
        lease.acquire()
    assert not lease.held and read_lease(open_storage(url)) == theirs


def test_a_renewal_finds_the_lease_taken_over_and_leaves_it(url: str) -> None:
    storage = open_storage(url)
    lease = Lease(storage, 0.2, where=url)
    lease.acquire()
    theirs = record(host=OTHER_HOST)
    write(storage, theirs)
    assert lease.renew() == ("lost", theirs)
    assert not lease.held
    assert lease.release() is False
    assert read_lease(storage) == theirs


def test_a_renewal_writes_a_missing_lease_again(url: str) -> None:
    storage = open_storage(url)
    lease = Lease(storage, 0.2, where=url)
    lease.acquire()
    storage.remove(LEASE_FILE)
    assert lease.renew() == ("restored", None)
    now = read_lease(storage)
    assert now is not None and lease.record is not None and now.token == lease.record.token
    lease.release()


def test_lease_on_s3(s3: S3Run, sleeper: subprocess.Popen[bytes]) -> None:  # noqa: F811
    storage = open_storage(s3.url, s3.options)
    lease = Lease(storage, 0.2, where=s3.url)
    assert lease.acquire() is None
    assert lease.renew() == ("renewed", None)
    assert json.loads(s3.fs.cat_file(f"{s3.bucket}/run/{LEASE_FILE}"))["beat"] == 1
    with pytest.raises(ht.RunDirInUseError, match="this process holds it"):
        Lease(open_storage(s3.url, s3.options), 0.2, where=s3.url).acquire()
    assert lease.release() is True
    assert not s3.fs.exists(f"{s3.bucket}/run/{LEASE_FILE}")

    write(storage, held_by(sleeper))
    with pytest.raises(ht.RunDirInUseError, match=f"pid {sleeper.pid} is running"):
        Lease(storage, 0.2, where=s3.url).acquire()
    sleeper.kill()
    sleeper.wait()
    taken = Lease(storage, 0.2, where=s3.url)
    assert taken.acquire() is not None
    taken.release()


def test_fit_on_s3_holds_the_lease_while_it_runs(s3: S3Run, tmp_path: Path) -> None:  # noqa: F811
    seen: list[bool] = []
    trainer = make_trainer(s3.url, ht.CheckpointPolicy(every_steps=2, heartbeat=0.2),
                           storage_options=s3.options, log_dir=tmp_path / "logs")

    def step_fn(batch: torch.Tensor) -> torch.Tensor:
        seen.append(s3.fs.exists(f"{s3.bucket}/run/{LEASE_FILE}"))
        return trainer.model(batch).pow(2).mean()

    trainer.fit(step_fn, 4)
    assert seen == [True] * 4
    assert not s3.fs.exists(f"{s3.bucket}/run/{LEASE_FILE}")
    assert {"lease_acquired", "lease_released"} <= set(event_names(tmp_path / "logs"))


# ------------------------------------------------------------------------- the trainer


def make_trainer(run_dir: str | Path, checkpoint: ht.CheckpointPolicy | None,
                 **kwargs: Any) -> ht.HardenedTrainer:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = [torch.randn(8, 4) for _ in range(8)]
    return ht.HardenedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                              run_dir, checkpoint=checkpoint, **kwargs)


def test_fit_refuses_a_run_dir_in_use_before_the_first_step(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run_dir = tmp_path / "run"
    theirs = held_by(sleeper)
    write(open_storage(str(run_dir)), theirs)
    trainer = make_trainer(run_dir, ht.CheckpointPolicy(every_steps=2))
    calls: list[int] = []
    with pytest.raises(ht.RunDirInUseError, match=f"pid {sleeper.pid}") as refused:
        trainer.fit(lambda batch: calls.append(1) or trainer.model(batch).sum(), 4)
    assert refused.value.holder == theirs.public()
    assert calls == [] and trainer.step == 0
    assert sorted(os.listdir(run_dir)) == ["events.jsonl", LEASE_FILE]  # no metrics, no ckpt
    assert event_names(run_dir) == ["lease_refused"]
    assert read_lease(open_storage(str(run_dir))) == theirs


@pytest.mark.parametrize("ending", ["finished", "error", "preempted"])
def test_fit_releases_the_lease_however_it_ends(tmp_path: Path, ending: str) -> None:
    run_dir = tmp_path / "run"
    trainer = make_trainer(run_dir, ht.CheckpointPolicy(every_steps=2))
    held: list[bool] = []

    def step_fn(batch: torch.Tensor) -> torch.Tensor:
        held.append((run_dir / LEASE_FILE).exists())
        if trainer.step == 2 and ending == "error":
            raise ValueError("a bug in the step")
        if trainer.step == 2 and ending == "preempted":
            os.kill(os.getpid(), signal.SIGTERM)
        return trainer.model(batch).pow(2).mean()

    if ending == "finished":
        trainer.fit(step_fn, 4)
    else:
        with pytest.raises(ValueError if ending == "error" else ht.Preempted):
            trainer.fit(step_fn, 4)
    assert held and all(held)
    assert not (run_dir / LEASE_FILE).exists()
    names = event_names(run_dir)
    assert names[0] == "lease_acquired" and names[-1] == "lease_released"
    again = make_trainer(run_dir, ht.CheckpointPolicy(every_steps=2))
    assert again.fit(lambda b: again.model(b).sum(), 4).step == 4  # the next fit takes it


def test_a_lease_only_where_fit_writes_into_run_dir(tmp_path: Path) -> None:
    def names(trainer: ht.HardenedTrainer) -> list[str]:
        return [f.name for f in trainer._features()]

    run_dir = tmp_path / "run"
    assert names(make_trainer(run_dir, ht.CheckpointPolicy()))[:3] == [
        "preemption", "lease", "logs"]
    assert "lease" in names(make_trainer(run_dir, None))  # the logs go into run_dir
    assert "lease" not in names(make_trainer(run_dir, None, log_dir=tmp_path / "logs"))
    lease = next(f for f in make_trainer(run_dir, None)._features() if f.name == "lease")
    assert isinstance(lease, lease_feature.RunDirLease) and lease.heartbeat_s == 30.0
    policy = ht.CheckpointPolicy(heartbeat="2min")
    lease = next(f for f in make_trainer(run_dir, policy)._features() if f.name == "lease")
    assert isinstance(lease, lease_feature.RunDirLease) and lease.heartbeat_s == 120.0


def test_a_job_whose_lease_is_taken_over_stops_without_saving(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    storage = open_storage(str(run_dir))
    trainer = make_trainer(run_dir, ht.CheckpointPolicy(every=None, every_steps=2,
                                                        async_save=False, heartbeat=0.05))
    theirs = record(host=OTHER_HOST)

    def taken_over() -> bool:
        if "lease_lost" in event_names(run_dir):
            return True
        if read_lease(storage) != theirs:  # not yet, or a renewal read before it and wrote
            write(storage, theirs)         # after it: the other job takes the lease again
        return False

    def step_fn(batch: torch.Tensor) -> torch.Tensor:
        if trainer.step == 5:  # in step 6: another job takes the lease over
            wait_for(taken_over, why="lease_lost")
        return trainer.model(batch).pow(2).mean()

    with pytest.raises(ht.RunDirInUseError) as lost:
        trainer.fit(step_fn, 40)
    message = str(lost.value)
    assert "another job took over this run directory's lease" in message
    assert f"pid {theirs.pid} on host {OTHER_HOST}" in message
    assert "stopped after step 6 and saved nothing more" in message
    assert lost.value.holder == theirs.public()
    assert trainer.step == 6
    assert read_lease(storage) == theirs  # left to its holder
    saved = [e["step"] for e in events(run_dir, "checkpoint_saved")]
    assert saved == [2, 4]  # step 6 was due, and not saved
    assert events(run_dir, "lease_lost_save_skipped")[0]["step"] == 6
    lost_event = events(run_dir, "lease_lost")[0]
    assert lost_event["holder"] == theirs.public()
    assert "lease_released" not in event_names(run_dir)


class Flaky:
    """The run directory's storage, failing the lease writes numbered in ``fail``."""

    def __init__(self, storage: Storage, fail: set[int]) -> None:
        self.storage, self.fail, self.num_writes = storage, fail, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def write_bytes(self, path: str, data: bytes) -> Any:
        self.num_writes += 1
        if self.num_writes in self.fail:
            raise ConnectionResetError(f"write {self.num_writes}: connection reset by peer")
        return self.storage.write_bytes(path, data)


def test_renewal_errors_do_not_stop_the_run(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setattr(lease_feature, "open_storage",
                        lambda root, options: Flaky(open_storage(root, options), {2, 3}))
    trainer = make_trainer(run_dir, ht.CheckpointPolicy(every_steps=2, heartbeat=0.05))

    def renewed_after_failures() -> bool:
        now = read_lease(open_storage(str(run_dir)))
        return event_names(run_dir).count("lease_renew_failed") == 2 and (
            now is not None and now.beat >= 1)

    def step_fn(batch: torch.Tensor) -> torch.Tensor:
        if trainer.step == 2:
            wait_for(renewed_after_failures, why="two failed renewals, then one")
        return trainer.model(batch).pow(2).mean()

    assert trainer.fit(step_fn, 4).step == 4
    failed = events(run_dir, "lease_renew_failed")
    assert [e["num_failed"] for e in failed] == [1, 2]
    assert "connection reset by peer" in failed[0]["error"]
    assert not (run_dir / LEASE_FILE).exists()


def test_a_storage_that_fails_the_lease_at_start_is_a_storage_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setattr(lease_feature, "open_storage",
                        lambda root, options: Flaky(open_storage(root, options), {1}))
    trainer = make_trainer(run_dir, ht.CheckpointPolicy(every_steps=2))
    with pytest.raises(ht.CheckpointStorageError, match=r"could not take the run directory's "
                       r"lease .* connection reset by peer") as failed:
        trainer.fit(lambda b: b.sum(), 4)
    assert "runbooks/storage-errors.md" in str(failed.value)
    assert not (run_dir / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ ranks


def rank_worker(rank: int, rendezvous: str, run_dir: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=2)
    trainer = make_trainer(run_dir, ht.CheckpointPolicy(every_steps=2))
    try:
        trainer.fit(lambda batch: trainer.model(batch).sum(), 4)
        result = {"refused": None}
    except ht.RunDirInUseError as e:
        result = {"refused": str(e), "holder": e.holder, "step": trainer.step}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_every_rank_refuses_when_rank_0_is_refused(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run_dir = tmp_path / "run"
    theirs = held_by(sleeper)
    write(open_storage(str(run_dir)), theirs)
    mp.start_processes(rank_worker, nprocs=2, start_method="spawn",
                       args=(str(tmp_path / "rdzv"), str(run_dir), str(tmp_path)))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1]
    assert f"pid {sleeper.pid}" in seen[0]["refused"] and seen[0]["step"] == 0
    assert seen[0]["holder"] == theirs.public()
    assert not (run_dir / "metrics.jsonl").exists()


# -------------------------------------------------------------------------- real jobs


def job(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(JOB), "--run-dir", str(run_dir), *args]


def test_a_second_job_refuses_and_a_restart_takes_a_killed_jobs_lease_over(
        tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    done = subprocess.run(job(straight), capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr

    run_dir, ready = tmp_path / "run", tmp_path / "first.ready"
    first = subprocess.Popen(job(run_dir, "--hold-at", "10", "--ready", str(ready)), env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(ready.exists, timeout_s=120, why="the first job to reach step 10")
        wait_for(lambda: [e["step"] for e in events(run_dir, "checkpoint_saved")] == [5, 10],
                 why="step 10's checkpoint (async) to commit")
        metrics_before = (run_dir / "metrics.jsonl").read_bytes()
        num_events = len(event_names(run_dir))

        second = subprocess.run(job(run_dir), capture_output=True, text=True, timeout=120,
                                env=ENV)
        assert second.returncode != 0
        assert "RunDirInUseError" in second.stderr
        assert f"is in use by another job: pid {first.pid} on host {socket.gethostname()}" \
            in second.stderr
        assert "done" not in second.stdout
        assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
        assert event_names(run_dir)[num_events:] == ["lease_refused"]
        assert first.poll() is None  # the first job is untouched
    finally:
        first.kill()
        first.wait()

    restart = subprocess.run(job(run_dir), capture_output=True, text=True, timeout=120,
                             env=ENV)
    assert restart.returncode == 0, restart.stderr
    assert "done step=20 resumed_from=10" in restart.stdout
    taken = events(run_dir, "lease_taken_over")
    assert len(taken) == 1 and taken[0]["previous"]["pid"] == first.pid
    assert taken[0]["reason"] == f"pid {first.pid} is not running"  # at once, no watch
    assert not (run_dir / LEASE_FILE).exists()
    assert sorted(losses(run_dir)) == list(range(1, 21))
    assert_same_run(run_dir, straight)
