"""Reading a run's metrics.jsonl and events.jsonl while starts come and go."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class StartRecord:
    """One start of the tortured run and where its lines begin in the run's logs (byte
    offsets), so that a line can be traced to the start that wrote it."""

    number: int
    metrics_offset: int
    events_offset: int


def record_start(run_dir: Path, number: int) -> StartRecord:
    return StartRecord(number, size(run_dir / "metrics.jsonl"), size(run_dir / "events.jsonl"))


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_jsonl(path: Path, start: int = 0, end: int | None = None, *,
               complete: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects in bytes [start, end) of ``path``, and how many torn fragments
    were skipped. A process killed mid-write leaves a line cut short, and the next start
    appends its first line right after it: whole objects on such a line are kept.
    ``complete``: stop at the last newline (the file is still being written)."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except FileNotFoundError:
        return [], 0
    if complete:
        data = data[: data.rfind(b"\n") + 1]
    return parse_jsonl(data)


def parse_jsonl(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects in ``data`` and the torn fragments skipped (see ``read_jsonl``)."""
    objects: list[dict[str, Any]] = []
    torn = 0
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", errors="replace").strip()
        pos = 0
        while pos < len(line):
            obj, end_pos = _decode_at(line, pos)
            if obj is None:
                torn += 1
                pos = line.find("{", pos + 1)
                if pos < 0:
                    break
                continue
            objects.append(obj)
            pos = end_pos
    return objects, torn


def _decode_at(line: str, pos: int) -> tuple[dict[str, Any] | None, int]:
    """A whole object at ``pos`` that ends the line or is followed by the next object
    (so that an object nested in a torn fragment is not taken for a line)."""
    try:
        obj, end = _DECODER.raw_decode(line, pos)
    except json.JSONDecodeError:
        return None, pos
    if not isinstance(obj, dict) or (end < len(line) and line[end] != "{"):
        return None, pos
    return obj, end


class Tail:
    """The whole lines appended to a JSONL file as it grows, from byte ``offset`` on.
    ``read()`` costs one ``stat`` while nothing was appended."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path, self.offset = path, offset

    def read(self) -> list[dict[str, Any]]:
        """The objects on the lines completed since the last call."""
        if size(self.path) <= self.offset:
            return []
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        data = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        self.offset += len(data)
        return parse_jsonl(data)[0]


def start_events(run_dir: Path, start: StartRecord, *, complete: bool = False,
                 ) -> list[dict[str, Any]]:
    """Rank 0's events written by ``start`` (and any later start)."""
    return rank0(read_jsonl(run_dir / "events.jsonl", start.events_offset,
                            complete=complete)[0])


def rank0(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("rank", 0) == 0 and isinstance(e.get("time"), int | float)]


def first(events: list[dict[str, Any]], *names: str) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") in names), None)


def newest_checkpoint(run_dir: Path, before: float) -> int | None:
    """The newest step committed (a ``checkpoint_saved`` event) before unix time ``before``."""
    steps = [e["step"] for e in read_jsonl(run_dir / "events.jsonl")[0]
             if e.get("event") == "checkpoint_saved" and isinstance(e.get("step"), int)
             and isinstance(e.get("time"), int | float) and e["time"] <= before]
    return max(steps, default=None)
