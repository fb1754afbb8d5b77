"""What a checkpoint folder holds, byte for byte: names, the manifest, checksums, tensors.

    checkpoints/step-00001200/
        rank-00000.safetensors    rank 0's tensors (safetensors format)
        rank-00000.json           rank 0's JSON state
        ...                       one pair per rank
        run.json                  the run's metadata (HardenedTrainer; rank 0)
        git-diff.patch            uncommitted changes, when there are any (rank 0)
        MANIFEST.json             written last: every file, its size and XXH3-128 checksum

Each file's entry holds its size, the XXH3-128 of the whole file (what ``xxh128sum``
prints, for checking by hand) and the XXH3-128 of each 4 MiB chunk, which loading
verifies on every core at once. XXH3 detects truncation, bit rot and torn writes at
~12 GB/s per core; it is not a defence against an attacker who can also rewrite the
manifest.

Only two file types are ever read: ``.safetensors`` (parsed in ``_safetensors``, never
through pickle) and ``.json``; ``.patch`` files are kept and verified as text, never parsed.
A manifest naming anything else is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
import xxhash

from hardtrain.checkpoint._limits import (
    MAX_DEPTH,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_TENSORS,
    MAX_WORLD_SIZE,
    CapError,
    JsonShape,
    check_cap,
    load_json,
)

MANIFEST = "MANIFEST.json"
SET_ASIDE_NOTE = "SET-ASIDE.json"  # in a set-aside folder: why, when, by which process
FORMAT = "hardtrain-checkpoint"
FORMAT_VERSION = 1
CHECKSUM = "xxh3_128"
CHUNK_BYTES = 4 << 20
LOADABLE_SUFFIXES = (".safetensors", ".json")
TEXT_SUFFIXES = (".patch",)  # kept and verified, never parsed (git-diff.patch)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
TMP_MARKER = ".tmp-"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_SET_ASIDE_DIR = re.compile(r"^step-(\d{8,})\.rejected-")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


SAVABLE_DTYPES = frozenset(DTYPES.values())


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def set_aside_dir_name(step: int, stamp: str) -> str:
    """A set-aside folder's name: never a step folder, so loading and retention pass it."""
    return f"{step_dir_name(step)}.rejected-{stamp}"


def parse_set_aside_dir(name: str) -> int | None:
    match = _SET_ASIDE_DIR.match(name)
    return int(match.group(1)) if match else None


def tensors_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def state_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def checksum(data: Any) -> str:
    """XXH3-128 of a buffer (bytes, memoryview, mmap), as hex."""
    return str(xxhash.xxh3_128_hexdigest(data))


@dataclass(frozen=True)
class Digest:
    num_bytes: int
    checksum: str  # the whole file
    chunks: tuple[str, ...]  # each CHUNK_BYTES piece, in order


class Hasher:
    """Whole-file and per-chunk checksums in one pass, fed pieces of any size in order."""

    def __init__(self) -> None:
        self._whole = xxhash.xxh3_128()
        self._chunk = xxhash.xxh3_128()
        self._chunk_fill = 0
        self._chunks: list[str] = []
        self._num_bytes = 0

    def update(self, data: Any) -> None:
        view = memoryview(data)
        self._whole.update(view)
        self._num_bytes += len(view)
        while len(view):
            take = min(len(view), CHUNK_BYTES - self._chunk_fill)
            self._chunk.update(view[:take])
            self._chunk_fill += take
            view = view[take:]
            if self._chunk_fill == CHUNK_BYTES:
                self._chunks.append(str(self._chunk.hexdigest()))
                self._chunk, self._chunk_fill = xxhash.xxh3_128(), 0

    def digest(self) -> Digest:
        chunks = self._chunks + ([str(self._chunk.hexdigest())] if self._chunk_fill else [])
        return Digest(self._num_bytes, str(self._whole.hexdigest()), tuple(chunks))


def digest_of(data: Any) -> Digest:
    hasher = Hasher()
    hasher.update(data)
    return hasher.digest()


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and TMP_MARKER in name


def looks_like_pickle(name: str, head: bytes) -> bool:
    # Protocol 2+ pickles start with 0x80; torch.save zip archives with "PK".
    return name.endswith(PICKLE_SUFFIXES) or head[:1] == b"\x80" or head[:2] == b"PK"


class ManifestError(ValueError):
    """The manifest is missing, unreadable or malformed; the message says which."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    rank: int
    digest: Digest

    @property
    def num_bytes(self) -> int:
        return self.digest.num_bytes


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    created: datetime
    chunk_bytes: int
    files: dict[str, FileEntry]

    @property
    def num_bytes(self) -> int:
        return sum(f.num_bytes for f in self.files.values())


def encode_manifest(step: int, world_size: int, files: list[FileEntry]) -> bytes:
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "created": datetime.now(timezone.utc).isoformat(),
        "checksum_algorithm": CHECKSUM,
        "chunk_bytes": CHUNK_BYTES,
        "files": {
            f.name: {
                "bytes": f.num_bytes, "rank": f.rank,
                CHECKSUM: f.digest.checksum, "chunks": list(f.digest.chunks),
            }
            for f in sorted(files, key=lambda f: f.name)
        },
    }
    body["manifest_checksum"] = checksum(_canonical(body))
    data = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()
    check_cap("the manifest would be", len(data), MAX_MANIFEST_BYTES, " bytes")  # unreadable
    return data


def check_manifest_size(num_bytes: int) -> None:
    """ManifestError over MAX_MANIFEST_BYTES: checked before the manifest is read."""
    try:
        check_cap("is", num_bytes, MAX_MANIFEST_BYTES, " bytes")
    except CapError as e:
        raise ManifestError(str(e)) from None


def decode_manifest(data: bytes, expected_step: int) -> Manifest:
    """Parse and check a manifest; ManifestError says what is wrong with it. It is parsed
    before its own checksum can be checked, so nothing in it is trusted: sizes and
    counts are checked against the caps before anything is built from them."""
    check_manifest_size(len(data))
    try:
        body = load_json(data, _check_manifest_shape)
    except ValueError as e:
        raise ManifestError(f"garbled: {e}" if not isinstance(e, CapError) else str(e)) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ManifestError(f"not a {FORMAT} manifest")
    if body.get("version") != FORMAT_VERSION:
        raise ManifestError(
            f"format version {_short(body.get('version'))}; this hardtrain reads "
            f"{FORMAT_VERSION}"
        )
    claimed = body.pop("manifest_checksum", None)
    if claimed != checksum(_canonical(body)):
        raise ManifestError("its own checksum does not match (edited or corrupted)")
    try:
        step = _count(body, "step")
        world_size = _count(body, "world_size")
        check_cap("claims world size", world_size, MAX_WORLD_SIZE)
        created = datetime.fromisoformat(_typed(body, "created", str))
        chunk_bytes = _count(body, "chunk_bytes")
        listed = _typed(body, "files", dict)
        check_cap("lists", len(listed), MAX_FILES, " files")
        if step != expected_step:
            raise ManifestError(f"says step {step} but lies in {step_dir_name(expected_step)}")
        if world_size < 1:
            raise ManifestError(f"world_size={world_size}: there is no rank")
        if chunk_bytes != CHUNK_BYTES:  # every hardtrain has written 4 MiB chunks
            raise ManifestError(f"chunk_bytes={chunk_bytes}; this hardtrain reads {CHUNK_BYTES}")
        files = {name: _file_entry(name, entry) for name, entry in listed.items()}
    except ManifestError:
        raise
    except CapError as e:
        raise ManifestError(str(e)) from None
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ManifestError(f"malformed ({type(e).__name__}: {e})") from None
    return Manifest(step, world_size, created, chunk_bytes, files)


def _check_manifest_shape(shape: JsonShape) -> None:
    """Before a manifest is parsed: no more arrays and objects than MAX_FILES files take
    (an entry and its chunk list each, the file list, the manifest)."""
    check_cap("holds", shape.containers, 2 * MAX_FILES + 2, " arrays and objects")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _typed(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body[key]
    if not isinstance(value, kind):
        raise TypeError(f"{key} is {_short(value)}, not a {kind.__name__}")
    return value


def _count(body: dict[str, Any], key: str) -> int:
    value = body[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{key} is {_short(value)}, not an int >= 0")
    return value


_HEX = re.compile(r"^[0-9a-f]{32}$")
_RANK_FILE = re.compile(r"^rank-(\d{5,})\.(?:safetensors|json)$")


def _file_entry(name: Any, entry: Any) -> FileEntry:
    """One file's entry, checked: a plain name of a type hardtrain reads, sizes and ranks
    that are counts, and exactly as many chunk checksums as the size takes."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ManifestError(f"names {_short(name)}, which is not a plain file name")
    if not name.endswith(LOADABLE_SUFFIXES + TEXT_SUFFIXES):
        raise ManifestError(
            f"names {name!r}; hardtrain loads only .safetensors and .json (and keeps "
            ".patch as text), never pickle"
        )
    if not isinstance(entry, dict):
        raise TypeError(f"{name}: entry is {_short(entry)}, not an object")
    num_bytes, rank = _count(entry, "bytes"), _count(entry, "rank")
    whole, chunks = entry[CHECKSUM], _typed(entry, "chunks", list)
    if (match := _RANK_FILE.match(name)) and int(match.group(1)) != rank:
        raise ManifestError(f"lists {name} under rank {rank}")
    expected = -(-num_bytes // CHUNK_BYTES)
    if len(chunks) != expected:
        raise ManifestError(
            f"{name}: {len(chunks)} chunk checksums for {num_bytes} bytes, which take {expected}"
        )
    for value in (whole, *chunks):
        if not isinstance(value, str) or not _HEX.match(value):
            raise ManifestError(f"{name}: {_short(value)} is not an {CHECKSUM} checksum")
    return FileEntry(name, rank, Digest(num_bytes, whole, tuple(chunks)))


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    check_cap("tensors: a checkpoint file holds", len(tensors), MAX_TENSORS, " tensors")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor name {name!r}: names must be non-empty strings")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise TypeError(f"tensors[{name!r}] is {t.layout}; save a dense tensor (.to_dense())")
        if t.dtype not in SAVABLE_DTYPES:
            raise TypeError(f"tensors[{name!r}] has dtype {t.dtype}, which safetensors cannot hold")


def encode_state(state: Mapping[str, Any]) -> bytes:
    """JSON of ``state``, refusing anything that would not load back equal (tuples, non-str
    keys, objects): exact resume needs exact state; and nesting that loading would
    refuse (MAX_DEPTH)."""
    def check(value: Any, path: str, depth: int = 1) -> None:
        if isinstance(value, dict | list) and depth > MAX_DEPTH:
            raise ValueError(f"{path} is nested {depth} levels deep in the state; at most "
                             f"{MAX_DEPTH} load back (docs/checkpoints.md)")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(f"{path} has key {key!r}; JSON state needs str keys")
                check(item, f"{path}[{key!r}]", depth + 1)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                check(item, f"{path}[{i}]", depth + 1)
        elif not (value is None or isinstance(value, (str, int, float, bool))):
            raise TypeError(
                f"{path} is a {type(value).__name__}; state holds only dict, list, str, int, "
                "float, bool and None (put tensors in `tensors`, make tuples lists)"
            )
    check(dict(state), "state")
    return json.dumps(state, sort_keys=True).encode()


def check_extra_files(files: Mapping[str, bytes]) -> None:
    """Extra files a rank adds to its checkpoint folder: plain names with a suffix the
    manifest accepts, never a rank file or the manifest itself."""
    for name, data in files.items():
        if (not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name
                or name.startswith("rank-") or name == MANIFEST or is_tmp_name(name)
                or not name.endswith(LOADABLE_SUFFIXES + TEXT_SUFFIXES)):
            raise ValueError(
                f"files: {name!r} is not a name a checkpoint can hold; use a plain file name "
                "ending in .json or .patch, not starting with 'rank-'"
            )
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"files[{name!r}]={type(data).__name__}: expected bytes")


def check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: must be an int >= 0")


def compare_digests(actual: Digest, expected: Digest, chunk_bytes: int) -> str | None:
    """Where two digests of a file differ, for the message; None when they agree."""
    if chunk_bytes == CHUNK_BYTES:
        for index, (mine, theirs) in enumerate(zip(actual.chunks, expected.chunks, strict=False)):
            if mine != theirs:
                start = index * chunk_bytes
                end = min(start + chunk_bytes, actual.num_bytes)
                return f"bytes {start}..{end}: xxh3_128 {mine}, manifest says {theirs}"
        if len(actual.chunks) != len(expected.chunks):
            return f"{len(actual.chunks)} chunks, manifest lists {len(expected.chunks)}"
    if actual.checksum != expected.checksum:
        return f"xxh3_128 {actual.checksum}, manifest says {expected.checksum}"
    return None


_LISTED_GAPS = 8  # a manifest's gaps named one by one; the rest are counted


def manifest_gaps(manifest: Manifest) -> list[tuple[str, str, str]]:
    """(file, reason, detail) for each rank of the manifest's world whose two files are
    not both listed, and for each file of a rank outside that world: the first few, and
    a count of the rest (a hostile manifest may claim a world of a million ranks)."""
    world_size, files = manifest.world_size, manifest.files
    listed = sum(1 for e in files.values()
                 if e.rank < world_size and e.name in (tensors_file(e.rank), state_file(e.rank)))
    num_missing = 2 * world_size - listed
    problems: list[tuple[str, str, str]] = []
    for rank in range(world_size):
        if len(problems) >= min(num_missing, _LISTED_GAPS):
            break
        problems += [(name, "missing", f"the manifest lists no file for rank {rank}")
                     for name in (tensors_file(rank), state_file(rank)) if name not in files]
    if num_missing > len(problems):
        problems.append((
            "...", "missing",
            f"{num_missing - len(problems)} more: the manifest claims {world_size} ranks and "
            f"lists {listed} of their {2 * world_size} files"))
    outside = [e for e in files.values() if not 0 <= e.rank < world_size]
    problems += [(e.name, "manifest", f"rank {e.rank} outside world size {world_size}")
                 for e in outside[:_LISTED_GAPS]]
    if len(outside) > _LISTED_GAPS:
        problems.append(("...", "manifest", f"{len(outside) - _LISTED_GAPS} more files of "
                         f"ranks outside world size {world_size}"))
    return problems
