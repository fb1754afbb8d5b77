"""Two run directories compared bit for bit: metrics lines and the final checkpoint."""

from __future__ import annotations

import copy
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hardtrain._loop.state import STATE_KEY
from hardtrain.checkpoint import CheckpointStore, LoadedCheckpoint
from hardtrain.errors import CheckpointError
from hardtrain.torture._logs import StartRecord, first, rank0, read_jsonl
from hardtrain.torture._reports import Comparison, Divergence, TortureError

_Lines = list[dict[str, Any]]
# The process-wide RNG streams the trainer saves (hardtrain.state.capture_rng), and where
# in its state: the current ones, and those of the epoch's start (the data's position).
GLOBAL_STREAMS = ("python", "numpy", "torch", "cuda")
_STREAM_HOMES = (("rng",), ("data", "epoch_start_rng"))
_JSON_STREAMS = ("python", "numpy")  # torch's are tensors


class NoEvents:
    """Comparing only reads: no ``checkpoint_loaded`` lines in the runs' events."""

    def record(self, event: str, **fields: object) -> None:
        pass


def compare_runs(reference: str | os.PathLike[str], tortured: str | os.PathLike[str],
                 starts: Sequence[StartRecord] = ()) -> Comparison:
    """Compare two run directories bit for bit: every tortured metrics line against the
    reference's line for its step (loss and lr), and the newest committed checkpoints
    (step, world size, then every rank's tensors and JSON state). ``starts`` attributes
    tortured lines to the start that wrote them."""
    reference, tortured = Path(reference), Path(tortured)
    expected = _by_step(read_jsonl(reference / "metrics.jsonl")[0])
    starts = list(starts) or [StartRecord(1, 0, 0)]
    segments, num_torn = _lines_by_start(tortured, starts)
    metrics = _first_metrics_divergence(expected, segments, _resumes(tortured, starts))
    ref_store = CheckpointStore(reference, events=NoEvents())
    tor_store = CheckpointStore(tortured, events=NoEvents())
    infos = ref_store.list()
    if not infos:
        raise TortureError(f"{reference} has no committed checkpoint to compare")
    step, world_size = infos[-1].step, infos[-1].world_size or 1
    num_tensors, num_differing, checkpoint, only_rng = _compare_checkpoints(
        ref_store, tor_store, step, world_size)
    return Comparison(len(expected), sum(len(lines) for _, lines in segments), num_torn, step,
                      world_size, num_tensors, num_differing, metrics, checkpoint, only_rng)


# ----------------------------------------------------------------------------- metrics


def _by_step(lines: _Lines) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for line in lines:
        if isinstance(line.get("step"), int):
            found.setdefault(line["step"], line)
    return found


def _segments(starts: list[StartRecord], offsets: list[int]) -> list[tuple[int, int, int | None]]:
    """(start number, first byte, end byte or None) of each start's lines."""
    ends: list[int | None] = [*offsets[1:], None]
    return [(s.number, a, b) for s, a, b in zip(starts, offsets, ends, strict=True)]


def _lines_by_start(run_dir: Path,
                    starts: list[StartRecord]) -> tuple[list[tuple[int, _Lines]], int]:
    """(start number, its metrics lines) in order, and the torn fragments skipped."""
    path, found, num_torn = run_dir / "metrics.jsonl", [], 0
    for number, a, b in _segments(starts, [s.metrics_offset for s in starts]):
        lines, torn = read_jsonl(path, a, b)
        found.append((number, [e for e in lines if isinstance(e.get("step"), int)]))
        num_torn += torn
    return found, num_torn


def _resumes(run_dir: Path, starts: list[StartRecord]) -> dict[int, int | None]:
    """start number -> the step it resumed from (None: a fresh start)."""
    path, found = run_dir / "events.jsonl", {}
    for number, a, b in _segments(starts, [s.events_offset for s in starts]):
        resumed = first(rank0(read_jsonl(path, a, b)[0]), "resumed")
        found[number] = None if resumed is None else resumed.get("from_step")
    return found


def _first_metrics_divergence(expected: dict[int, dict[str, Any]],
                              segments: list[tuple[int, _Lines]],
                              resumes: dict[int, int | None]) -> Divergence | None:
    """At the smallest step where a tortured line differs from the reference's (loss,
    then lr), or that only one of the runs logged."""
    found: list[Divergence] = []
    seen: set[int] = set()
    for number, lines in segments:
        for line in lines:
            step = line["step"]
            seen.add(step)
            context = _written_by(number, step, resumes)
            reference = expected.get(step)
            if reference is None:
                found.append(Divergence(step, "extra", "-", f"loss {_show(line.get('loss'))}",
                                        context=context))
                continue
            for key in ("loss", "lr"):
                if not same_json(reference.get(key), line.get(key)):
                    found.append(Divergence(step, key, _show(reference.get(key)),
                                            _show(line.get(key)), context=context))
                    break
    found += [Divergence(step, "missing", f"loss {_show(expected[step].get('loss'))}", "-")
              for step in expected.keys() - seen]
    return min(found, key=lambda d: d.step or 0, default=None)


def _written_by(number: int, step: int, resumes: dict[int, int | None]) -> str:
    resumed_from = resumes.get(number)
    if resumed_from is None:
        return f"logged by start {number} (a fresh start)"
    text = f"logged by start {number}, which resumed from step {resumed_from}"
    return text + (" (its first step after the resume)" if step == resumed_from + 1 else "")


# -------------------------------------------------------------------------- checkpoints


def _compare_checkpoints(ref_store: CheckpointStore, tor_store: CheckpointStore, step: int,
                         world_size: int,
                         ) -> tuple[int, int, Divergence | None, tuple[str, ...]]:
    """(tensors compared, tensors differing, first difference, the RNG streams that
    differ if nothing else does) between the reference's newest committed checkpoint
    ``step`` and the tortured run's newest."""
    infos = tor_store.list()
    if not infos:
        return 0, 0, Divergence(step, "checkpoint", f"step {step}",
                                "no committed checkpoint"), ()
    if (infos[-1].step, infos[-1].world_size or 1) != (step, world_size):
        return 0, 0, Divergence(step, "checkpoint", f"newest step {step}, {world_size} rank(s)",
                                f"newest step {infos[-1].step}, {infos[-1].world_size} "
                                "rank(s)"), ()
    num_tensors, num_differing, found = 0, 0, None
    streams: set[str] = set()
    elsewhere = False
    for rank in range(world_size):
        a = ref_store.load(step, rank=rank)
        b, problem = _load(tor_store, step, rank)
        if b is None:
            return num_tensors, num_differing, Divergence(step, "checkpoint", "loads",
                                                          problem), ()
        for name in sorted(a.tensors.keys() | b.tensors.keys()):
            num_tensors += 1
            difference = _tensor_difference(a.tensors.get(name), b.tensors.get(name))
            if difference is not None:
                num_differing += 1
                found = found or Divergence(step, "tensor", *difference, rank=rank, name=name)
                stream = _tensor_stream(name)
                if stream is None:
                    elsewhere = True
                else:
                    streams.add(stream)
        state = _json_difference(a.state, b.state, "state")
        if state is not None:
            if found is None:
                found = Divergence(step, "state", state[1], state[2], rank=rank, name=state[0])
            rest_a, streams_a = _split_streams(a.state)
            rest_b, streams_b = _split_streams(b.state)
            elsewhere |= _json_difference(rest_a, rest_b, "state") is not None
            streams |= {key[1] for key in streams_a.keys() | streams_b.keys()
                        if not same_json(streams_a.get(key), streams_b.get(key))}
    only_rng = () if elsewhere else tuple(s for s in GLOBAL_STREAMS if s in streams)
    return num_tensors, num_differing, found, only_rng


def _tensor_stream(name: str) -> str | None:
    """The RNG stream a saved tensor holds ("torch", "cuda"), or None for any other."""
    for home in _STREAM_HOMES:
        prefix = "/".join(home) + "/"
        if name.startswith(prefix):
            stream = name[len(prefix):].split("/")[0]
            return stream if stream in GLOBAL_STREAMS else None
    return None


def _split_streams(state: Any) -> tuple[Any, dict[tuple[str, str], Any]]:
    """``state`` without the RNG streams the trainer saved in it, and those streams by
    (where, stream)."""
    trainer = state.get(STATE_KEY) if isinstance(state, dict) else None
    if not isinstance(trainer, dict):
        return state, {}
    trainer = copy.deepcopy(trainer)
    found = {}
    for home in _STREAM_HOMES:
        node: Any = trainer
        for key in home:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            found.update({("/".join(home), s): node.pop(s) for s in GLOBAL_STREAMS if s in node})
    return {**state, STATE_KEY: trainer}, found


def fresh_streams(root: Path, step: int) -> dict[int, dict[str, Any]] | None:
    """Rank -> the RNG streams (``GLOBAL_STREAMS`` that it holds) of committed checkpoint
    ``step`` under ``root``; None if it cannot be read (damaged, or not written by
    HardenedTrainer)."""
    store = CheckpointStore(root, events=NoEvents())
    try:
        info = next(i for i in store.list() if i.step == step)
        found = {}
        for rank in range(info.world_size or 1):
            loaded = store.load(step, rank=rank)
            rng = loaded.state[STATE_KEY]["rng"]
            found[rank] = {s: rng[s] for s in _JSON_STREAMS if s in rng}
            for name, tensor in sorted(loaded.tensors.items()):
                stream = _tensor_stream(name)
                if stream is not None and name.startswith("rng/"):
                    found[rank].setdefault(stream, []).append(bytes(_bytes_of(tensor).numpy()))
    except (StopIteration, CheckpointError, OSError, ValueError, KeyError, TypeError):
        return None  # no evidence: nothing is claimed from it
    return found


def differing_streams(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]],
                      ) -> tuple[str, ...]:
    """The streams of ``fresh_streams`` that differ on some rank."""
    return tuple(s for s in GLOBAL_STREAMS if any(
        not same_json(a.get(r, {}).get(s), b.get(r, {}).get(s)) for r in a.keys() | b.keys()))


def _load(store: CheckpointStore, step: int, rank: int) -> tuple[LoadedCheckpoint | None, str]:
    try:
        return store.load(step, rank=rank), ""
    except Exception as e:  # damaged or unreadable: a finding about the tortured run
        return None, f"rank {rank} does not load: {type(e).__name__}: {e}"


def _tensor_difference(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[str, str] | None:
    """None if dtype, shape and every byte are equal (so NaN equals NaN and -0.0 differs
    from 0.0), else both sides described."""
    if a is None or b is None:
        return ("absent" if a is None else "present", "absent" if b is None else "present")
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype} {list(a.shape)}", f"{b.dtype} {list(b.shape)}"
    bytes_a, bytes_b = _bytes_of(a), _bytes_of(b)
    if torch.equal(bytes_a, bytes_b):
        return None
    numel = a.numel()
    differ = (bytes_a.reshape(numel, -1) != bytes_b.reshape(numel, -1)).any(dim=1).nonzero()
    i = int(differ[0, 0])
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    return (f"{len(differ)} of {numel} elements differ, first at flat index {i}: "
            f"{flat_a[i].item()!r}", f"{flat_b[i].item()!r}")


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _json_difference(a: Any, b: Any, path: str) -> tuple[str, str, str] | None:
    """(path, value, value) where two JSON trees first differ; floats bit for bit."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            if key not in a or key not in b:
                return (f"{path}/{key}", _show(a.get(key, "(absent)")),
                        _show(b.get(key, "(absent)")))
            found = _json_difference(a[key], b[key], f"{path}/{key}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _json_difference(x, y, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if same_json(a, b) else (path, _show(a), _show(b))


def same_json(a: Any, b: Any) -> bool:
    """Equal values of the same type, floats bit for bit (NaN equals NaN, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return bool(a == b)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
