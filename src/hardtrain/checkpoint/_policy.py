"""CheckpointPolicy: when the trainer saves. Decisions only; no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

_UNITS = {
    "ms": 0.001, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}
_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*")


def parse_duration(value: timedelta | str | float, *, field: str) -> timedelta:
    """``timedelta``, seconds as a number, or a string like "90s", "30min", "2h", "1h30min"."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise TypeError(
            f"{field}={value!r}: expected a timedelta, seconds, or a string like '30min'"
        )
    text, seconds, pos = value.strip().lower(), 0.0, 0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(
                f"{field}={value!r}: not a duration; write it like '90s', '30min', '2h' or "
                "'1h30min' (units: ms, s, min, h, d)"
            )
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError(f"{field}={value!r}: empty duration; write it like '30min'")
    return timedelta(seconds=seconds)


@dataclass(frozen=True, kw_only=True)
class CheckpointPolicy:
    """When ``HardenedTrainer.fit`` saves. Either trigger saves; a final checkpoint is
    always written at ``max_steps``. Pass ``checkpoint=None`` to the trainer for none at all.

    every: wall-clock time since the last save finished (time spent saving does not
        count): a ``timedelta``, seconds, or a string such as "90s", "30min", "2h".
        > 0, or None for no time trigger. With several ranks, the ranks vote: one rank's
        clock saying "due" makes every rank save the same step.
    every_steps: save every this many optimizer steps (>= 1), or None.
    keep_last: committed checkpoints kept on disk (>= 1), or None to keep all.
    async_save: write in a background thread after a copy to staging memory (True), or
        block the loop until the checkpoint is committed (False).
    max_unsaved: how long the run may go on without a committed checkpoint while saves
        fail (storage down, disk full): a failed save is an event and a warning, training
        goes on, and the next save is tried when due; past ``max_unsaved`` since the last
        commit (or the start), the run stops with ``CheckpointStorageError``. None: three
        times ``every``, at least 10 minutes (2 hours with ``every_steps`` alone).
    retry_for: how long one storage operation is retried on a transient error (timeout,
        throttling, connection reset, 5xx), with exponential backoff and jitter; 0 retries
        nothing.
    heartbeat: how often the run's lease on its ``run_dir`` is renewed (rank 0). A second
        job on the same ``run_dir`` refuses to start while the lease is alive; the lease of
        a killed job blocks a restart on another host for at most this long (on the same
        host, not at all).
    """

    every: timedelta | str | float | None = timedelta(minutes=30)
    every_steps: int | None = None
    keep_last: int | None = 3
    async_save: bool = True
    max_unsaved: timedelta | str | float | None = None
    retry_for: timedelta | str | float = timedelta(minutes=2)
    heartbeat: timedelta | str | float = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if self.every is not None:
            every = parse_duration(self.every, field="every")
            if every <= timedelta(0):
                raise ValueError(f"every={self.every!r}: must be > 0, or None for no time trigger")
            object.__setattr__(self, "every", every)
        if self.every_steps is not None and (
            isinstance(self.every_steps, bool) or not isinstance(self.every_steps, int)
            or self.every_steps < 1
        ):
            raise ValueError(f"every_steps={self.every_steps!r}: must be an int >= 1, or None")
        if self.every is None and self.every_steps is None:
            raise ValueError(
                "every=None and every_steps=None: no checkpoint would be saved before the final "
                "one, so a crash would lose the whole run. Set every (e.g. '30min') or "
                "every_steps; to run without checkpoints, pass checkpoint=None to the trainer."
            )
        if self.keep_last is not None and (
            isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int)
            or self.keep_last < 1
        ):
            raise ValueError(
                f"keep_last={self.keep_last!r}: must be an int >= 1, or None to keep all"
            )
        if not isinstance(self.async_save, bool):
            raise ValueError(f"async_save={self.async_save!r}: must be True or False")
        for name, at_least in (("max_unsaved", 0.0), ("retry_for", None), ("heartbeat", 0.0)):
            value = getattr(self, name)
            if value is None and name == "max_unsaved":
                continue
            duration = parse_duration(value, field=name)
            if duration < timedelta(0) or (at_least is not None and duration <= timedelta(0)):
                raise ValueError(f"{name}={value!r}: must be > 0" if at_least is not None
                                 else f"{name}={value!r}: must be >= 0 (0: no retries)")
            object.__setattr__(self, name, duration)

    @property
    def every_s(self) -> float | None:
        """``every`` in seconds, or None."""
        if self.every is None:
            return None
        return parse_duration(self.every, field="every").total_seconds()

    @property
    def max_unsaved_s(self) -> float:
        """``max_unsaved`` in seconds, the default worked out."""
        if self.max_unsaved is not None:
            return parse_duration(self.max_unsaved, field="max_unsaved").total_seconds()
        every_s = self.every_s
        return 7200.0 if every_s is None else max(3 * every_s, 600.0)

    @property
    def retry_for_s(self) -> float:
        return parse_duration(self.retry_for, field="retry_for").total_seconds()

    @property
    def heartbeat_s(self) -> float:
        return parse_duration(self.heartbeat, field="heartbeat").total_seconds()
