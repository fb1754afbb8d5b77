"""Which process wrote something, and whether it still runs: for the run directory's
lease and for temporary files, whose owners must be provably gone before anything of
theirs is taken over or removed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time

import psutil


def boot_and_namespace() -> str | None:
    """This boot of this machine and this pid namespace (containers on one host have
    their own): pids compare only within one. None where /proc does not tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def machine_key() -> str:
    """8 hex digits for this host, boot and pid namespace (the host name alone where
    /proc does not tell)."""
    key = socket.gethostname()
    with contextlib.suppress(TypeError):
        key += "/" + str(boot_and_namespace() or "")
    return hashlib.blake2s(key.encode(), digest_size=4).hexdigest()


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def liveness(pid: int, started: float | None, *, tolerance_s: float) -> tuple[bool | None, str]:
    """Whether process ``pid`` of this machine, started at ``started``, still runs (None:
    it cannot be told), and why. A zombie has exited; a pid whose process started at
    another time is another process now."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False, f"pid {pid} has exited"
        now = float(process.create_time())
    except psutil.NoSuchProcess:
        return False, f"pid {pid} is not running"
    except (psutil.Error, OverflowError, ValueError) as e:
        return None, f"pid {pid} cannot be checked ({type(e).__name__})"
    if started is None:
        return None, f"pid {pid} runs, and nothing says when its process started"
    if abs(now - started) > tolerance_s:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return False, f"pid {pid} is now another process (started {when})"
    return True, f"pid {pid} is running"
