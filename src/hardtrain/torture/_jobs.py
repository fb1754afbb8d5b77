"""Starting the command, signalling it, and making sure nothing of it outlives its start.

A job is one start of the command, in a session of its own. Its processes are those in
its process group and those carrying its token in their environment: torchrun starts
each worker in a session of its own, so the process group alone misses them, while the
environment is inherited by everything the command starts (unless it is cleared).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hardtrain.torture._reports import TortureError

RUN_DIR_VAR = "HARDTRAIN_RUN_DIR"
TOKEN_VAR = "HARDTRAIN_TORTURE_JOB"
KILL_WAIT_S = 10.0  # for SIGKILLed processes to vanish
POLL_S = 0.01
_SCAN_S = 0.05  # between two scans of /proc
_TAIL_LINES = 30


class Job:
    """One start of the command: output to ``log``, ``RUN_DIR_VAR`` set to ``run_dir``."""

    def __init__(self, argv: list[str], env: dict[str, str], run_dir: Path, log: Path) -> None:
        self.run_dir, self.log = run_dir, log
        self.token = secrets.token_hex(8)
        env = {**env, RUN_DIR_VAR: str(run_dir), TOKEN_VAR: self.token}
        try:
            with log.open("wb") as out:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        except OSError as e:
            raise TortureError(f"cannot start {argv[0]!r}: {e}") from None
        self.launched = time.monotonic()

    def fail(self, message: str) -> TortureError:
        return TortureError(message, self.log, tail(self.log))

    def wait_exit(self, timeout_s: float | None) -> int | None:
        """The exit code, or None if it still runs after ``timeout_s``."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def sleep_until(self, when: float, poll: Callable[[], object] = lambda: None) -> bool:
        """Sleep until monotonic ``when``, calling ``poll`` between naps; False if the
        command exited first."""
        while (left := when - time.monotonic()) > 0:
            if self.proc.poll() is not None:
                return False
            poll()
            time.sleep(min(POLL_S, left))
        return self.proc.poll() is None

    def terminate_group(self) -> None:
        """SIGTERM to the command's process group, as Ctrl-C or ``kill -- -PGID``."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def kill_all(self) -> None:
        """SIGKILL to every process of the job at once."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def processes(self) -> set[int]:
        """Live processes of the job (zombies excluded). Without /proc: its process
        group only."""
        self.proc.poll()  # reap the command itself once it exited
        if not os.path.isdir("/proc"):
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return set()
            return {self.proc.pid}
        needle = f"{TOKEN_VAR}={self.token}".encode()
        return {int(name) for name in os.listdir("/proc")
                if name.isdigit() and _in_job(int(name), self.proc.pid, needle)}


def _in_job(pid: int, pgid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):  # exited, waiting to be reaped: harmless
            return False
        if int(fields[2]) == pgid:
            return True
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except (OSError, IndexError, ValueError):  # gone, or not ours to read
        return False


@contextlib.contextmanager
def launched(argv: list[str], env: dict[str, str], run_dir: Path, log: Path) -> Iterator[Job]:
    """A started job that does not outlive the block, whatever ends it (Ctrl-C too)."""
    job = Job(argv, env, run_dir, log)
    try:
        yield job
    finally:
        if job.proc.poll() is None or job.processes():
            job.kill_all()
            await_gone(job)


def end_job(job: Job, *, grace_s: float) -> float | None:
    """Give every process of the job ``grace_s`` seconds to exit, then SIGKILL what is
    left. Returns the unix time of that SIGKILL if the command itself was still running
    then, else None (stragglers it left are killed all the same). Raises TortureError if
    a process survives: a stale process must never write into the next start's run dir."""
    deadline = time.monotonic() + grace_s
    job.wait_exit(max(0.0, deadline - time.monotonic()))
    while job.proc.poll() is not None and job.processes():
        if time.monotonic() >= deadline:
            break
        time.sleep(_SCAN_S)
    running = job.proc.poll() is None
    if not running and not job.processes():
        return None
    killed_at = time.time()
    job.kill_all()
    await_gone(job)
    return killed_at if running else None


def await_gone(job: Job) -> None:
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        left = job.processes()
        if job.proc.poll() is not None and not left:
            return
        if time.monotonic() >= deadline:
            raise job.fail(
                f"processes {sorted(left)} of the command survive SIGKILL after "
                f"{KILL_WAIT_S:.0f}s (stuck in uninterruptible I/O?); stopping, so that none "
                "writes into the run directory of the next start")
        job.kill_all()
        time.sleep(_SCAN_S)


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def tail(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read it: {e})"
    return "\n".join(lines[-_TAIL_LINES:]) or "(empty)"
