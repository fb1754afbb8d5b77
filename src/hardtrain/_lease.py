"""The run directory's lease: one job at a time writes a run directory.

``lease.json`` in the run directory names the job that holds it (host, pid, when its
process and its ``fit`` started, a random token) and carries a heartbeat (a counter and a
time) that the holder rewrites every ``heartbeat_s``. It goes through the checkpoints'
storage (``open_storage``): an atomic write on a local disk, one PUT on an object store.

A job that wants the lease finds one of:

- no lease: it writes its own;
- a lease held from this machine (same host name, boot and pid namespace, so that pids
  compare): taken over at once when that pid is gone, a zombie, or another process under
  a reused pid (its start time differs); refused when it runs;
- a lease held from another machine, or one whose holder cannot be checked: watched for
  one of its holder's heartbeat periods plus a margin (``watch_s``). If it changes, its
  holder is alive: refused. If not, taken over. Only the lease's bytes are compared,
  never clocks of different hosts.

After every write the lease is read back. Object stores have no compare-and-swap, so two
jobs that start in the same instant may both see their own lease; each renewal reads the
lease before writing it, so the one that lost learns it at its next renewal.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

from hardtrain._process import boot_and_namespace, liveness, started_at
from hardtrain.checkpoint._storage import Storage
from hardtrain.errors import RunDirInUseError

LEASE_FILE = "lease.json"
_FORMAT = 1
_SAME_START_S = 0.01  # process start times of one process, read twice, agree to this
_MAX_ROUNDS = 3  # a lease that comes and goes while it is looked at: refuse after this
_LIVE: set[str] = set()  # tokens of the leases this process holds now


def watch_s(heartbeat_s: float) -> float:
    """How long a lease from another host is watched before it is taken over: one
    heartbeat period of its holder, plus a fifth of it and 1 s for a slow renewal."""
    return heartbeat_s * 1.2 + 1.0


@dataclass(frozen=True)
class LeaseRecord:
    """What ``lease.json`` holds. Times are Unix seconds of the holder's clock (shown to
    people; never compared with this host's)."""

    host: str
    machine: str | None  # boot id and pid namespace: pids compare only within one
    pid: int
    process_started_at: float | None
    job_started_at: float
    token: str
    beat: int
    beat_at: float
    heartbeat_s: float

    def encode(self) -> bytes:
        return json.dumps({"format": _FORMAT, **asdict(self)}, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None when ``data`` is not a lease this code can read."""
        try:
            raw = json.loads(data)
            return cls(host=str(raw["host"]), machine=raw.get("machine"), pid=int(raw["pid"]),
                       process_started_at=_float_or_none(raw.get("process_started_at")),
                       job_started_at=float(raw["job_started_at"]), token=str(raw["token"]),
                       beat=int(raw["beat"]), beat_at=float(raw["beat_at"]),
                       heartbeat_s=float(raw["heartbeat_s"]))
        except (ValueError, TypeError, KeyError):
            return None

    def public(self) -> dict[str, Any]:
        """The fields an error or event shows (not the token)."""
        return {"host": self.host, "pid": self.pid,
                "process_started_at": self.process_started_at,
                "job_started_at": self.job_started_at, "beat": self.beat,
                "beat_at": self.beat_at, "heartbeat_s": self.heartbeat_s}

    def describe(self) -> str:
        process = ("" if self.process_started_at is None
                   else f", its process started {_iso(self.process_started_at)}")
        return (f"pid {self.pid} on host {self.host} (its fit started "
                f"{_iso(self.job_started_at)}{process}; last heartbeat #{self.beat} at "
                f"{_iso(self.beat_at)} by its clock, renewed every {self.heartbeat_s:g} s)")


class Takeover(NamedTuple):
    """A lease that ``acquire`` took over: the one it found (None: it did not parse), why."""

    previous: LeaseRecord | None
    reason: str


class Renewal(NamedTuple):
    """What ``renew`` found. outcome: "renewed"; "restored" (the lease was gone and is
    written again); "lost" (another job holds it: ``holder``, None when it did not parse)."""

    outcome: str
    holder: LeaseRecord | None = None


class Lease:
    """One job's lease on a run directory (rank 0 holds it for the job).

    storage: the run directory's storage; heartbeat_s: how often the holder renews it;
    where: the run directory, for messages. Not thread-safe: the caller serialises
    ``renew`` and ``release``. ``sleep`` is a seam for tests.
    """

    def __init__(self, storage: Storage, heartbeat_s: float, *, where: str,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.storage = storage
        self.heartbeat_s = heartbeat_s
        self.where = where
        self._sleep = sleep
        self.record: LeaseRecord | None = None  # ours, while held

    @property
    def held(self) -> bool:
        return self.record is not None

    def acquire(self) -> Takeover | None:
        """Take the lease: None when there was none, a ``Takeover`` when a dead job's
        lease was replaced. Raises ``RunDirInUseError`` when its holder is alive, OSError
        (or the storage's error) when the storage fails. May watch the lease for up to
        ``watch_s`` of its holder's heartbeat."""
        self.storage.makedirs("")
        found: LeaseRecord | None = None
        for _ in range(_MAX_ROUNDS):
            seen = self._read()
            if seen is None:
                self._claim()
                return None
            found = LeaseRecord.decode(seen)
            alive, why = (None, "its lease file does not parse") if found is None else (
                _liveness(found))
            if alive:
                raise self._in_use(found, why)
            if alive is None:
                period = found.heartbeat_s if found is not None and found.heartbeat_s > 0 \
                    else self.heartbeat_s
                now, waited = self._watch(seen, watch_s(period))
                if now is None:
                    continue  # released while watched: look again
                if now != seen:
                    found = LeaseRecord.decode(now)
                    raise self._in_use(found, f"its heartbeat advanced while this job watched "
                                              f"the lease ({waited:.1f} s)")
                why = f"{why}, and its heartbeat did not advance in {waited:.1f} s"
            self._claim()
            return Takeover(found, why)
        raise self._in_use(found, "its lease came and went while this job looked at it")

    def renew(self) -> Renewal:
        """Read the lease back, then (still ours, or gone) write the next heartbeat. A
        lease another job holds now is left alone, and this one is no longer held."""
        record = self.record
        assert record is not None, "renew() of a lease not held"
        seen = self._read()
        outcome = "renewed"
        if seen is None:
            outcome = "restored"
        else:
            now = LeaseRecord.decode(seen)
            if now is None or now.token != record.token:
                self._let_go()
                return Renewal("lost", now)
        record = replace(record, beat=record.beat + 1, beat_at=time.time())
        self.storage.write_bytes(LEASE_FILE, record.encode())
        self.record = record
        return Renewal(outcome)

    def release(self) -> bool:
        """Delete the lease if it is still ours; whether it was."""
        record = self.record
        if record is None:
            return False
        seen = self._read()
        self._let_go()
        now = None if seen is None else LeaseRecord.decode(seen)
        if now is None or now.token != record.token:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.storage.remove(LEASE_FILE)
        return True

    # ------------------------------------------------------------------------ internals

    def _read(self) -> bytes | None:
        try:
            with self.storage.read(LEASE_FILE) as view:
                return bytes(view)
        except FileNotFoundError:
            return None

    def _claim(self) -> None:
        now = time.time()
        record = LeaseRecord(host=socket.gethostname(), machine=boot_and_namespace(),
                             pid=os.getpid(),
                             process_started_at=started_at(os.getpid()),
                             job_started_at=now, token=secrets.token_hex(16), beat=0,
                             beat_at=now, heartbeat_s=self.heartbeat_s)
        self.storage.write_bytes(LEASE_FILE, record.encode())
        seen = self._read()
        holder = None if seen is None else LeaseRecord.decode(seen)
        if holder is None or holder.token != record.token:  # another job wrote it at once
            raise self._in_use(holder, "it wrote the lease at the same moment as this job")
        self.record = record
        _LIVE.add(record.token)

    def _let_go(self) -> None:
        if self.record is not None:
            _LIVE.discard(self.record.token)
        self.record = None

    def _watch(self, seen: bytes, window_s: float) -> tuple[bytes | None, float]:
        """Read the lease until it differs from ``seen`` or ``window_s`` has passed:
        (what it holds then, None when it is gone; seconds watched)."""
        started = time.monotonic()
        poll_s = min(max(window_s / 20, 0.02), 2.0)
        while True:
            left = started + window_s - time.monotonic()
            if left <= 0:
                return seen, time.monotonic() - started
            self._sleep(min(poll_s, left))
            now = self._read()
            if now != seen:
                return now, time.monotonic() - started

    def _in_use(self, holder: LeaseRecord | None, why: str) -> RunDirInUseError:
        if holder is None:
            who = f"another job (its {LEASE_FILE} does not parse)"
            stop = "stop the other job"
        else:
            who = holder.describe()
            stop = f"stop the other job (`kill {holder.pid}` on {holder.host}: it saves and exits)"
        return RunDirInUseError(
            f"{self.where} is in use by another job: {who}; {why}. Two jobs writing one run "
            "directory would resume from each other's checkpoints and append the same steps "
            "to one metrics.jsonl, so this job stopped before its first step and wrote "
            f"nothing there. Either {stop}, or give this job a new run_dir. A lease left by "
            "a killed job does not block a restart: on the same host it is taken over at "
            "once, from another host after one heartbeat period without a renewal.",
            None if holder is None else holder.public())


def _liveness(record: LeaseRecord) -> tuple[bool | None, str]:
    """Whether the lease's holder is alive (None: this machine cannot tell), and why."""
    if record.host != socket.gethostname() or record.machine != boot_and_namespace():
        where = ("another host" if record.host != socket.gethostname()
                 else "another boot or pid namespace of this host")
        return None, f"it is held from {where}"
    pid = record.pid
    if pid == os.getpid():
        if record.token in _LIVE:
            return True, "this process holds it (another fit on the same run_dir)"
        return False, "an earlier fit of this process left it behind"
    return liveness(pid, record.process_started_at, tolerance_s=_SAME_START_S)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _iso(unix_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))
