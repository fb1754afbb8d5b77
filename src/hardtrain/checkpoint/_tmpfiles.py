"""Temporary files by owner: ``.<name>.tmp-<host>-<machine>-<pid>-<started>-<token>``
names who writes it (the host name for people; a key of the host, its boot and pid
namespace, so that pids compare only where they mean the same process; the pid and its
start time) and a random token. Cleanup removes a temporary file only when its owner is
provably gone (``removable``)."""

from __future__ import annotations

import functools
import os
import re
import secrets
import socket
from dataclasses import dataclass

import psutil

from hardtrain._process import liveness, machine_key, started_at
from hardtrain.checkpoint._format import TMP_MARKER

# ``.<name>.tmp-<host>-<machine>-<pid>-<started>-<token>``: who writes it (the host name
# for people; a key of the host, its boot and pid namespace, so that pids compare only
# where they mean the same process; the pid and its start time) and a random token.
# Cleanup removes a temporary file only when its owner is provably gone (``removable``).
_TMP_NAME = re.compile(
    r"^\.(?P<target>.+)" + re.escape(TMP_MARKER) + r"(?P<host>[A-Za-z0-9.-]+)-"
    r"(?P<machine>[0-9a-f]{8})-(?P<pid>\d+)-(?P<started>\d+)-(?P<token>[0-9a-f]{8})$"
)
_OLD_TMP_NAME = re.compile(r"^\..+" + re.escape(TMP_MARKER) + r"(?P<pid>\d+)-[0-9a-f]+$")
WRITING: set[str] = set()  # this process's temporary files being written now


@dataclass(frozen=True)
class TmpOwner:
    """The process that writes a temporary file."""

    host: str  # the host name (letters, digits, "." and "-"; at most 32 of them)
    machine: str  # 8 hex digits: host, boot and pid namespace
    pid: int
    started: int  # the process's start, in 1/100 s since the epoch; 0 when unknown


@functools.lru_cache(maxsize=4)
def own_owner(pid: int) -> TmpOwner:
    """This process (``os.getpid()``: a forked child is another owner)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:32] or "host"
    return TmpOwner(host, machine_key(), pid, round((started_at(pid) or 0) * 100))


def tmp_name(name: str, owner: TmpOwner | None = None) -> str:
    """A new temporary name for ``name``, beside it, owned by ``owner`` (this process)."""
    o = owner or own_owner(os.getpid())
    return f".{name}{TMP_MARKER}{o.host}-{o.machine}-{o.pid}-{o.started}-{secrets.token_hex(4)}"


def removable(name: str) -> bool:
    """Whether cleanup may remove the temporary file ``name``: this process's own (not
    being written now), or one whose owner is provably gone (written on this machine by
    a pid that is not running, is a zombie, or is another process now: its start time
    differs). An older hardtrain's ``.<name>.tmp-<pid>-<hex>`` (no host): when no process
    runs under that pid here. Any other (another machine's, a name that does not parse,
    a live owner's, one that cannot be checked) stays."""
    match = _TMP_NAME.match(name)
    try:
        if match is None:
            old = _OLD_TMP_NAME.match(name)
            return old is not None and not psutil.pid_exists(int(old["pid"]))
        me = own_owner(os.getpid())
        if match["machine"] != me.machine:
            return False
        pid, started = int(match["pid"]), int(match["started"])
        if pid == me.pid and started == me.started:
            return name not in WRITING
        if pid == me.pid:  # an earlier process had this pid: gone, if its start is known
            return started != 0
    except (OverflowError, ValueError):  # a wild pid: keep it
        return False
    alive, _ = liveness(pid, started / 100 if started else None, tolerance_s=0.011)
    return alive is False
