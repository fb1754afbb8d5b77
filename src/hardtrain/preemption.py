"""Preemption: a signal becomes a flag; the trainer stops every rank at one step and saves.

``PreemptionPolicy`` decides (which signals, how long until the kill, which exit code);
``PreemptionGuard`` installs the handlers while it is open and restores the previous ones
when it closes. The handler only records the signal: no collective, lock or I/O in it.
The trainer reads the flag in its per-step vote (see ``HardenedTrainer.fit``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

from hardtrain.checkpoint._policy import parse_duration

_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def _as_signal(value: Any) -> signal.Signals:
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(f"signals: {value!r} is not a signal name (e.g. 'SIGTERM')") from None
    try:
        return signal.Signals(value)
    except (ValueError, TypeError):
        raise ValueError(f"signals: {value!r} is not a signal number or name") from None


@dataclass(frozen=True, kw_only=True)
class PreemptionPolicy:
    """What ``HardenedTrainer.fit`` does when the machine is about to be taken away.

    On one of ``signals`` (on any rank), every rank finishes its current step, the ranks
    agree to stop at the same step, the save in flight is finished (or abandoned when it
    cannot finish in time), the current step is checkpointed synchronously if the cost
    of earlier saves says it fits before ``deadline``, and ``fit`` raises ``ht.Preempted``
    (a ``SystemExit``) with ``exit_code``. Pass ``preemption=None`` to the trainer to keep
    the signals' default actions.

    signals: the signals that mean "you will be killed soon" (names or numbers; not
        SIGKILL or SIGSTOP, which cannot be caught). Default SIGTERM (Kubernetes, spot
        VMs, torchrun, SLURM) and SIGUSR1 (SLURM's ``--signal=USR1@90``).
    deadline: time from the signal to the kill: a ``timedelta``, seconds, or a string
        like "25s" (> 0). Set it a few seconds below the platform's grace period (30 s
        on Kubernetes by default and under torchrun, 15 s on GKE spot pods, 2 min on AWS).
    exit_code: the process's exit status after a preemption (1-255), or None for
        128 + the signal's number (143 for SIGTERM), what a shell reports for a process
        the signal killed, and what restart policies treat as "restart me".
    """

    signals: tuple[signal.Signals | int | str, ...] = (signal.SIGTERM, signal.SIGUSR1)
    deadline: timedelta | str | float = timedelta(seconds=25)
    exit_code: int | None = None

    def __post_init__(self) -> None:
        raw = self.signals
        if isinstance(raw, signal.Signals | int | str):
            raw = (raw,)
        if not isinstance(raw, Iterable):
            raise ValueError(f"signals={self.signals!r}: expected a tuple of signals")
        signals = tuple(dict.fromkeys(_as_signal(s) for s in raw))
        if not signals:
            raise ValueError("signals=(): give at least one signal, or pass preemption=None "
                             "to the trainer to turn preemption handling off")
        for s in signals:
            if s in _UNCATCHABLE:
                raise ValueError(f"signals: {s.name} cannot be caught; use SIGTERM or SIGUSR1")
        object.__setattr__(self, "signals", signals)
        deadline = parse_duration(self.deadline, field="deadline")
        if deadline <= timedelta(0):
            raise ValueError(f"deadline={self.deadline!r}: must be > 0 (e.g. '25s')")
        object.__setattr__(self, "deadline", deadline)
        if self.exit_code is not None and (
            isinstance(self.exit_code, bool) or not isinstance(self.exit_code, int)
            or not 1 <= self.exit_code <= 255
        ):
            raise ValueError(f"exit_code={self.exit_code!r}: must be an int in 1..255 (0 would "
                             "tell the platform the job finished), or None for 128 + signal")

    @property
    def deadline_s(self) -> float:
        return parse_duration(self.deadline, field="deadline").total_seconds()

    def exit_code_for(self, signum: int) -> int:
        return self.exit_code if self.exit_code is not None else 128 + signum


class PreemptionGuard:
    """Records the policy's signals while open (a context manager); restores the previous
    handlers when closed. Works without the trainer:

        with ht.PreemptionGuard(ht.PreemptionPolicy()) as guard:
            for batch in data:
                train(batch)
                if guard.requested:
                    save(); raise SystemExit(guard.exit_code)

    Handlers can only be installed from the main thread; elsewhere ``armed`` is False
    and the signals keep their previous handlers. ``clock`` stamps ``received_at``.
    """

    def __init__(self, policy: PreemptionPolicy, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.signum: int | None = None  # the first signal received
        self.received_at: float | None = None  # clock() when it arrived
        self.num_received = 0
        self.armed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else self.policy.exit_code_for(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes: record only.
        self.num_received += 1
        if self.signum is None:
            self.signum = signum
            self.received_at = self._clock()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.policy.signals:
            assert isinstance(s, signal.Signals)
            self._previous[s] = signal.signal(s, self._handle)
        self.armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.armed = False


class _IgnoreInWorker:
    """A DataLoader ``worker_init_fn``: the worker ignores the preemption signals, then
    runs the user's own ``worker_init_fn``. PyTorch's workers die on SIGTERM, and torchrun
    and SLURM signal the whole process group: without this the training process would
    crash on "DataLoader worker ... is killed by signal" instead of saving. The worker
    still stops when its loader shuts it down, or when it sees its parent gone."""

    def __init__(self, signals: tuple[int, ...], inner: Callable[[int], None] | None) -> None:
        self.signals = signals
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)  # blocked at the fork
        if self.inner is not None:
            self.inner(worker_id)


class _Blocked:
    """Blocks ``signals`` in this thread while open (reusable). Workers forked meanwhile
    start with them blocked, so a signal between their fork and their ``worker_init_fn``
    waits instead of killing them; the parent gets it when the block ends."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        self._previous: set[int | signal.Signals] = set()

    def __enter__(self) -> None:
        self._previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)

    def __exit__(self, *exc: object) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous)


@contextlib.contextmanager
def shield_loader_workers(
    data: object, policy: PreemptionPolicy
) -> Iterator[contextlib.AbstractContextManager[None]]:
    """While open, worker processes that ``data`` (a DataLoader or StatefulDataLoader with
    workers) starts ignore ``policy.signals``; its ``worker_init_fn`` is put back after.
    Yields a context to hold while taking a batch (workers are forked then)."""
    inner = getattr(data, "worker_init_fn", None)
    if not getattr(data, "num_workers", 0) or isinstance(inner, _IgnoreInWorker):
        yield contextlib.nullcontext()
        return
    signals = tuple(int(s) for s in policy.signals)
    data.worker_init_fn = _IgnoreInWorker(signals, inner)  # type: ignore[attr-defined]
    try:
        yield _Blocked(signals)
    finally:
        data.worker_init_fn = inner  # type: ignore[attr-defined]


def signal_name(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
