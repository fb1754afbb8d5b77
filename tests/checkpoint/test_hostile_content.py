"""Checkpoint files written by someone who can write the run directory: the bytes match
the manifest (XXH3 is recomputable, so each damaged file is re-sealed in it), and only
what the content claims can give it away.

One rule for damage: whatever fails to read, parse, decode or fit a committed step's
files is damage of that step. ``load`` and a resuming ``fit`` fall back to the previous
step (a warning and an event naming the step, the file and the cause); ``verify``,
``hardtrain ls`` and ``hardtrain verify`` call it BAD for the same reason and still
report every other step. What a file claims is capped before anything is allocated for
it: a claim over a cap is refused with the cap and the value, in seconds and within a
small multiple of the file's size in memory (measured in a child process).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht
from hardtrain.checkpoint._format import CHUNK_BYTES, checksum, digest_of
from hardtrain.checkpoint._limits import (
    MAX_DEPTH,
    MAX_FILES,
    MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_TENSORS,
    MAX_WORLD_SIZE,
)

pytestmark = pytest.mark.timeout(300)

HARDTRAIN = shutil.which("hardtrain", path=os.path.dirname(sys.executable))
CLI_TIMEOUT_S = 60  # each command takes a second or two
TENSORS = "rank-00000.safetensors"
STATE = "rank-00000.json"


# ---------------------------------------------------------------------------- helpers


def folder(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def edit_manifest(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest's body and re-seal its own checksum, as a tamperer would."""
    path = ckpt / "MANIFEST.json"
    body = json.loads(path.read_text())
    body.pop("manifest_checksum")
    edit(body)
    body["manifest_checksum"] = checksum(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    path.write_text(json.dumps(body, indent=1, sort_keys=True))


def reseal(ckpt: Path, name: str, data: bytes) -> None:
    """Put ``data`` in place of ``name`` and make the manifest vouch for it."""
    (ckpt / name).write_bytes(data)
    digest = digest_of(data)

    def edit(body: dict[str, Any]) -> None:
        body["files"][name].update(bytes=len(data), xxh3_128=digest.checksum,
                                   chunks=list(digest.chunks))

    edit_manifest(ckpt, edit)


def safetensors(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert HARDTRAIN is not None, f"no hardtrain console script next to {sys.executable}"
    done = subprocess.run([HARDTRAIN, *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def assert_falls_back(run: Path, bad: int, good: int, file: str, *causes: str) -> None:
    """``load`` falls back from ``bad`` to ``good`` with a warning and an event naming
    the step, the file and the causes; ``verify``, ``hardtrain ls`` and ``hardtrain
    verify`` call ``bad`` BAD for the same reason and ``good`` verified."""
    store = ht.CheckpointStore(run)
    with pytest.warns(ht.CheckpointFallbackWarning) as warned:
        loaded = store.load()
    assert loaded.step == good
    message = str(warned[0].message)
    for part in (f"step-{bad:08d}", file, *causes):
        assert part in message, message
    records = store.events.records  # type: ignore[attr-defined]
    [event] = [r for r in records if r["event"] == "checkpoint_rejected"]
    assert event["step"] == bad and event["file"] == file
    report = store.verify(bad)
    assert not report.ok and report.problems[0].file == file, report
    assert all(c in str(report) for c in causes), report
    assert store.verify(good).ok
    ls = cli("ls", str(run))
    assert ls.returncode == 1, ls
    rows = {line.split()[0]: line for line in ls.stdout.splitlines()[1:]}
    assert "BAD" in rows[str(bad)] and all(c in rows[str(bad)] for c in causes), ls.stdout
    assert rows[str(good)].endswith("verified"), ls.stdout
    verify = cli("verify", str(run))
    assert verify.returncode == 1, verify
    assert f"step-{bad:08d}: FAILED" in verify.stdout and file in verify.stdout
    assert f"step-{good:08d}: ok" in verify.stdout, verify.stdout


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Steps 100 and 200, each with a weight and a bias, saved by the store."""
    store = ht.CheckpointStore(tmp_path / "run")
    for step in (100, 200):
        store.save(step, {"w": torch.full((4, 4), float(step)), "b": torch.zeros(4)},
                   {"step": step, "tensors": {"w": {"$tensor": "w"}}})
    return tmp_path / "run"


# -------------------------------------------------------- content that fails to parse


HOSTILE_TENSORS: dict[str, tuple[dict[str, Any] | bytes, bytes, str]] = {
    "negative shape": (
        {"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, b"\0" * 16,
        "shape is not a list of counts"),
    "shape beyond any tensor": (
        {"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}, b"",
        "larger than any tensor"),
    "offset 1e400": (
        b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1e400]}}', b"\0" * 16,
        "data_offsets is not a pair of counts"),
    "shape as floats": (
        {"w": {"dtype": "F32", "shape": [2.0, 2.0], "data_offsets": [0, 16]}}, b"\0" * 16,
        "shape is not a list of counts"),
    "unknown dtype": (
        {"w": {"dtype": "PICKLE", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16,
        "unknown dtype"),
    "entry not an object": ({"w": [1, 2, 3]}, b"", "its entry is not an object"),
    "header nested deep": (f'{{"__metadata__":{nested(100_000)}}}'.encode(), b"",
                           f"over the cap of {MAX_DEPTH} levels deep"),
    "too many dimensions": (
        {"w": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4,
        "65 dimensions, over the cap of 64"),
    "not UTF-8": (b"\xff\xfe{\x00}\x00", b"", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(HOSTILE_TENSORS))
def test_a_resealed_safetensors_file_that_does_not_parse_is_damage(
    run: Path, case: str
) -> None:
    header, data, cause = HOSTILE_TENSORS[case]
    reseal(folder(run, 200), TENSORS, safetensors(header, data))
    assert_falls_back(run, 200, 100, TENSORS, cause)


HOSTILE_STATES = {
    "nested 100,000 deep": ('{"a":' + nested(100_000) + "}",
                            f"nested 100001 levels deep, over the cap of {MAX_DEPTH}"),
    "nested 600 deep": ('{"a":' + nested(600) + "}", "nested 601 levels deep"),
    "not an object": ("[1, 2]", "state is not a JSON object"),
    "an int of 5000 digits": ('{"a": ' + "9" * 5000 + "}", "not JSON"),
    "not JSON": ("{'a': 1}", "not JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_STATES))
def test_a_resealed_state_that_does_not_parse_is_damage(run: Path, case: str) -> None:
    text, cause = HOSTILE_STATES[case]
    reseal(folder(run, 200), STATE, text.encode())
    assert_falls_back(run, 200, 100, STATE, cause)


def test_a_well_formed_state_nested_to_the_cap_loads(tmp_path: Path) -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH - 1):  # the state object itself is the first level
        deep = [deep]
    store = ht.CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(2)}, {"deep": deep})
    assert store.verify(1).ok
    assert store.load().state["deep"] == deep
    with pytest.raises(ValueError, match=f"nested {MAX_DEPTH + 1} levels deep"):
        store.save(2, {"w": torch.ones(2)}, {"deep": [deep]})  # never written, then refused


# ------------------------------------------------------- manifests parsed before trust


HOSTILE_MANIFESTS = {  # raw bytes: no re-sealing, they are parsed before their checksum
    "nested arrays": (nested(100_000), "nested 100000 levels deep, over the cap"),
    "an int of 5000 digits": ('{"format": ' + "9" * 5000 + "}", "garbled: not JSON"),
    "not UTF-8": ("\udcff", "garbled"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS))
@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_a_hostile_manifest_is_damage_of_its_step_only(
    run: Path, case: str, which: str
) -> None:
    text, cause = HOSTILE_MANIFESTS[case]
    bad, good = (200, 100) if which == "newest" else (100, 200)
    (folder(run, bad) / "MANIFEST.json").write_bytes(text.encode(errors="surrogateescape"))
    store = ht.CheckpointStore(run)
    [info] = [i for i in store.list() if i.step == bad]
    assert info.problem is not None and cause in info.problem
    report = store.verify(bad)
    assert report.problems[0].file == "MANIFEST.json" and cause in str(report), report
    if which == "newest":
        assert_falls_back(run, bad, good, "MANIFEST.json", cause)
    else:
        assert store.load().step == good
        for command in ("ls", "verify"):
            done = cli(command, str(run))
            assert done.returncode == 1 and "MANIFEST.json" in done.stdout, done
            assert cause in done.stdout, done.stdout


MANIFEST_CLAIMS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "world size 10**9": (lambda body: body.update(world_size=10**9),
                         f"claims world size 1000000000, over the cap of {MAX_WORLD_SIZE}"),
    "world size 0": (lambda body: body.update(world_size=0), "there is no rank"),
    "chunk_bytes=1": (lambda body: body.update(chunk_bytes=1),
                      f"chunk_bytes=1; this hardtrain reads {CHUNK_BYTES}"),
    "step 1e400": (lambda body: body.update(step=float("inf")), "not an int"),
    "size as a string": (lambda body: body["files"][STATE].update(bytes="12"),
                         "bytes is '12', not an int"),
    "missing chunk checksums": (lambda body: body["files"][TENSORS].update(chunks=[]),
                                "0 chunk checksums"),
    "a rank file of another rank": (lambda body: body["files"][STATE].update(rank=1),
                                    f"lists {STATE} under rank 1"),
    "a checksum that is no checksum": (
        lambda body: body["files"][STATE].update(xxh3_128="\x1b[2J"), "is not an xxh3_128"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CLAIMS))
def test_a_resealed_manifest_claiming_the_absurd_is_refused(run: Path, case: str) -> None:
    edit, cause = MANIFEST_CLAIMS[case]
    edit_manifest(folder(run, 200), edit)
    assert_falls_back(run, 200, 100, "MANIFEST.json", cause)


def test_verify_and_load_agree_on_chunk_bytes_1(run: Path) -> None:
    """Both refuse the manifest with one reason: chunks of another size are never
    checked one way by verify and another by load."""
    edit_manifest(folder(run, 200), lambda body: body.update(chunk_bytes=1))
    store = ht.CheckpointStore(run)
    report = store.verify(200)
    with pytest.warns(ht.CheckpointFallbackWarning) as warned:
        assert store.load().step == 100
    assert [str(p) for p in report.problems] == [
        f"MANIFEST.json: manifest (chunk_bytes=1; this hardtrain reads {CHUNK_BYTES})"]
    assert str(report.problems[0]) in str(warned[0].message)
    with pytest.raises(ht.CheckpointCorruptError, match="chunk_bytes=1"):
        store.load(200)


def test_a_world_of_many_ranks_lists_a_few_missing_files_and_counts_the_rest(
    run: Path,
) -> None:
    edit_manifest(folder(run, 200), lambda body: body.update(world_size=MAX_WORLD_SIZE))
    report = ht.CheckpointStore(run).verify(200)
    assert len(report.problems) <= 10
    assert report.problems[-1].detail == (
        f"{2 * MAX_WORLD_SIZE - 2 - 8} more: the manifest claims {MAX_WORLD_SIZE} ranks "
        f"and lists 2 of their {2 * MAX_WORLD_SIZE} files")


# ------------------------------------------------------------------ tensors it lacks


def test_a_state_referring_to_a_tensor_the_file_lacks_is_damage_for_a_check(
    run: Path,
) -> None:
    """The store does not know what a state refers to; its caller's ``check`` does, and
    what the check raises is damage of that step."""
    data = (folder(run, 200) / TENSORS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    del header["w"]  # "b" first: the larger elements (none) go first, then by name
    header["b"]["data_offsets"] = [0, 16]
    reseal(folder(run, 200), TENSORS, safetensors(header, data[8 + length : 8 + length + 16]))

    def check(loaded: ht.LoadedCheckpoint) -> None:
        for ref in loaded.state["tensors"].values():
            loaded.tensors[ref["$tensor"]]  # KeyError: 'w'

    store = ht.CheckpointStore(run)
    assert store.verify(200).ok  # the file itself holds together
    with pytest.warns(ht.CheckpointFallbackWarning, match=r"step-00000200: rank-00000\.json: "
                      r"inconsistent \(KeyError: 'w'\)"):
        assert store.load(check=check).step == 100

    def mismatch(loaded: ht.LoadedCheckpoint) -> None:
        raise ht.CheckpointMismatchError("it is another model")

    with pytest.raises(ht.CheckpointMismatchError, match="it is another model"):
        ht.CheckpointStore(run).load(check=mismatch)


# ---------------------------------------------------------------- the CLI's terminal


def test_names_with_escape_sequences_are_printed_escaped(run: Path) -> None:
    fake = "x\x1b[2K\r\x1b[1Astep-00000100: ok\nall 2 checkpoint(s) verified.json"
    (folder(run, 200) / fake).write_bytes(b"{}")
    verify = cli("verify", str(run))
    assert verify.returncode == 0, verify
    assert "\x1b" not in verify.stdout and "\r" not in verify.stdout
    assert ("ignored, not in the manifest: x\\x1b[2K\\r\\x1b[1Astep-00000100: ok\\nall 2 "
            "checkpoint(s) verified.json") in verify.stdout
    printed = [line for line in verify.stdout.splitlines() if not line.startswith("  ")]
    assert sum("step-00000100: ok" in line for line in printed) == 1, verify.stdout
    assert sum("checkpoint(s) verified" in line for line in printed) == 1, verify.stdout
    # a manifest naming such a file: refused, its name escaped
    edit_manifest(folder(run, 200), lambda body: body["files"].update(
        {fake: body["files"][STATE]}))
    for command in ("ls", "verify"):
        done = cli(command, str(run))
        assert done.returncode == 1 and "\x1b" not in done.stdout, done


# ------------------------------------------------------------ claims and the memory

_MEASURE = textwrap.dedent("""
    import json, sys, time, warnings
    import hardtrain as ht
    run, what = sys.argv[1], sys.argv[2]
    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))
    ht.CheckpointStore(run).list()  # the imports and the first listing
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    before, started = kib("VmRSS:"), time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if what == "load":
            result = ht.CheckpointStore(run).load().step
        else:
            result = [str(p) for p in ht.CheckpointStore(run).verify(200).problems]
    print(json.dumps({"grew_mib": (kib("VmHWM:") - before) / 1024, "result": result,
                      "s": time.perf_counter() - started,
                      "warnings": [str(w.message) for w in seen]}))
""")


def measure(run: Path, what: str) -> dict[str, Any]:
    """Peak RSS growth (MiB) and time of ``load`` or ``verify(200)`` in a new process."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(run), what],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def zero_size_tensors(count: int) -> bytes:
    header = {f"t{i:07d}": {"dtype": "F32", "shape": [0, 4096], "data_offsets": [0, 0]}
              for i in range(count)}
    return safetensors(json.dumps(header, separators=(",", ":")).encode())


def big_header(num_bytes: int) -> bytes:
    """A valid header of ``num_bytes`` bytes: one tensor, and metadata to fill it."""
    text = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"__metadata__":{"x":"'
    text += b"a" * (num_bytes - len(text) - 3) + b'"}}'
    return safetensors(text, b"\0" * 16)


CLAIMS: dict[str, tuple[Callable[[Path], object], str, str, int]] = {
    # case: (damage of step 200, the file, the cause, how many times its size the
    # reader may hold at once beyond 32 MiB: 0 where it is refused before it is read;
    # otherwise a copy of it, its structure scanned in pieces, and the mapped file)
    "world size 10**9": (
        lambda ckpt: edit_manifest(ckpt, lambda body: body.update(world_size=10**9)),
        "MANIFEST.json", "claims world size 1000000000, over the cap of 1048576", 0),
    "a 200 MB manifest": (
        lambda ckpt: (ckpt / "MANIFEST.json").write_bytes(b" " * 200_000_000),
        "MANIFEST.json", f"is 200000000 bytes, over the cap of {MAX_MANIFEST_BYTES}", 0),
    "a 60 MB manifest of empty arrays": (
        lambda ckpt: (ckpt / "MANIFEST.json").write_bytes(
            b"[" + b"[]," * 20_000_000 + b"[]]"),
        "MANIFEST.json", f"holds 20000002 arrays and objects, over the cap of "
        f"{2 * MAX_FILES + 2}", 3),
    "a header of empty arrays": (
        lambda ckpt: reseal(ckpt, TENSORS, safetensors(
            b'{"__metadata__":{"x":[' + b"[]," * 20_000_000 + b"[]]}}")),
        TENSORS, "header of 1 entries holds 20000004 arrays and objects, over the cap of 5", 3),
    "a header over the cap": (
        lambda ckpt: reseal(ckpt, TENSORS, big_header(MAX_HEADER_BYTES + 8)),
        TENSORS, f"header of {MAX_HEADER_BYTES + 8} bytes, over the cap of 100000000", 0),
    "1.3 M zero-size tensors": (
        lambda ckpt: reseal(ckpt, TENSORS, zero_size_tensors(1_300_000)), TENSORS,
        f"header lists 1300000 entries, over the cap of {MAX_TENSORS} tensors", 3),
}


@pytest.mark.parametrize("case", list(CLAIMS))
@pytest.mark.parametrize("what", ["load", "verify"])
def test_claims_over_a_cap_are_refused_before_allocating(
    run: Path, case: str, what: str
) -> None:
    damage, file, cause, times = CLAIMS[case]
    damage(folder(run, 200))
    size_mib = (folder(run, 200) / file).stat().st_size / (1 << 20)
    found = measure(run, what)
    if what == "load":
        assert found["result"] == 100, found
        assert file in found["warnings"][0] and cause in found["warnings"][0], found
    else:
        assert found["result"][0].startswith(file) and cause in found["result"][0], found
    mapped = size_mib if what == "load" and file == TENSORS else 0  # hashed before parsed
    assert found["grew_mib"] < 32 + times * size_mib + mapped, (found, size_mib)
    assert found["s"] < 10, found


def test_a_header_just_under_the_cap_parses_within_a_few_times_its_size(run: Path) -> None:
    reseal(folder(run, 200), TENSORS, big_header(MAX_HEADER_BYTES))
    found = measure(run, "load")
    assert found["result"] == 200 and not found["warnings"], found
    assert found["grew_mib"] < 5 * MAX_HEADER_BYTES / (1 << 20), found  # mapped file included


# ------------------------------------------------------------------ a resuming fit


def make(run_dir: Path) -> tuple[ht.HardenedTrainer, Callable[[Any], torch.Tensor]]:
    ht.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = [(torch.randn(2, 4), torch.randn(2, 1)) for _ in range(16)]
    trainer = ht.HardenedTrainer(
        model, opt, data, run_dir, metadata=None,
        checkpoint=ht.CheckpointPolicy(every=None, every_steps=4, async_save=False))

    def step_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    return trainer, step_fn


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer's run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    trainer, step_fn = make(run_dir)
    trainer.fit(step_fn, max_steps=8)
    return run_dir


def trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE).read_bytes())  # type: ignore[no-any-return]


def drop_tensor(ckpt: Path, name: str) -> None:
    """Rewrite the safetensors file without ``name``, re-sealed."""
    tensors = ht.CheckpointStore(ckpt.parent.parent).load(int(ckpt.name[5:])).tensors
    del tensors[name]
    scratch = ckpt.parent.parent.parent / "scratch"
    ht.CheckpointStore(scratch).save(1, tensors)
    reseal(ckpt, TENSORS, (folder(scratch, 1) / TENSORS).read_bytes())
    shutil.rmtree(scratch)


def rewrite_state(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    state = trainer_state(ckpt)
    edit(state["hardtrain"])
    reseal(ckpt, STATE, json.dumps(state).encode())


def deep_features(saved: dict[str, Any]) -> None:
    saved["features"]["deep"] = json.loads(nested(600))


def bad_torch_rng(saved: dict[str, Any]) -> None:
    saved["rng"]["torch"] = saved["model"]["0.bias"]  # a float tensor of 8


def no_signature(saved: dict[str, Any]) -> None:
    del saved["signature"]


def bad_position(saved: dict[str, Any]) -> None:
    saved["data"]["epoch"] = "first"


def bad_ndarray(saved: dict[str, Any]) -> None:
    numpy_state = saved["rng"]["numpy"]["$tuple"]
    numpy_state[1] = {"$ndarray": ["<U10000000", [624], [1] * 624]}


RESUME_DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "a model tensor missing": (lambda ckpt: drop_tensor(ckpt, "model/0.bias"), STATE,
                               "tensor(s) that the checkpoint's tensors do not include: "
                               "'model/0.bias'"),
    "600 levels of nesting": (lambda ckpt: rewrite_state(ckpt, deep_features), STATE,
                              "over cap (nested 603 levels deep, over the cap of 64"),
    "an RNG state that cannot be set": (
        lambda ckpt: rewrite_state(ckpt, bad_torch_rng), STATE,
        "inconsistent (TypeError: RNG state must be a torch.ByteTensor"),
    "no signature": (lambda ckpt: rewrite_state(ckpt, no_signature), STATE,
                     "'signature' is None, not a dict"),
    "a data position of strings": (lambda ckpt: rewrite_state(ckpt, bad_position), STATE,
                                   "the data position is"),
    "a numpy array of 4 GB strings": (lambda ckpt: rewrite_state(ckpt, bad_ndarray), STATE,
                                      "$ndarray of 624 '<U10000000'"),
}


FILE_DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "shape [-2, -2]": (lambda ckpt: reseal(ckpt, TENSORS, safetensors(
        {"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, b"\0" * 16)),
        TENSORS, "shape is not a list of counts"),
    "shape [2**63, 0]": (lambda ckpt: reseal(ckpt, TENSORS, safetensors(
        {"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}})),
        TENSORS, "larger than any tensor"),
    "offset 1e400": (lambda ckpt: reseal(ckpt, TENSORS, safetensors(
        b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1e400]}}', b"\0" * 16)),
        TENSORS, "data_offsets is not a pair of counts"),
    "state nested 100,000 deep": (
        lambda ckpt: reseal(ckpt, STATE, ('{"a":' + nested(100_000) + "}").encode()),
        STATE, "nested 100001 levels deep"),
    "manifest of nested arrays": (
        lambda ckpt: (ckpt / "MANIFEST.json").write_text(nested(100_000)),
        "MANIFEST.json", "nested 100000 levels deep"),
    "world size 10**9": (
        lambda ckpt: edit_manifest(ckpt, lambda body: body.update(world_size=10**9)),
        "MANIFEST.json", "claims world size 1000000000"),
}


@pytest.mark.parametrize("case", [*RESUME_DAMAGE, *FILE_DAMAGE])
def test_a_resuming_fit_falls_back_past_files_that_do_not_parse_or_decode(
    trained: Path, tmp_path: Path, case: str
) -> None:
    damage, file, cause = {**RESUME_DAMAGE, **FILE_DAMAGE}[case]
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    damage(folder(run_dir, 8))
    trainer, step_fn = make(run_dir)
    with pytest.warns(ht.CheckpointFallbackWarning) as warned:
        result = trainer.fit(step_fn, max_steps=10)
    assert result.resumed_from == 4 and result.step == 10
    message = str(warned[0].message)
    assert "step-00000008" in message and f"{file}: " in message and cause in message, message
    with open(run_dir / "events.jsonl", encoding="utf-8") as f:
        [event] = [e for e in map(json.loads, f) if e["event"] == "checkpoint_rejected"]
    assert event["step"] == 8 and cause in event["reason"]


def test_a_checkpoint_that_does_not_list_a_layer_is_a_mismatch_not_damage(
    trained: Path, tmp_path: Path
) -> None:
    """The tensor and the state's own record of it are both gone: as if the model had
    changed, which is the user's to sort out. Nothing is loaded, nothing falls back."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    drop_tensor(folder(run_dir, 8), "model/0.bias")
    rewrite_state(folder(run_dir, 8), lambda saved: saved["model"].pop("0.bias"))
    trainer, step_fn = make(run_dir)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ht.CheckpointMismatchError,
                       match=r"model keys missing from the checkpoint: 0\.bias"):
        trainer.fit(step_fn, max_steps=10)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())


def test_many_zero_size_tensors_cost_what_as_many_real_ones_would(run: Path) -> None:
    """Tensors that claim nothing still cost their entry, their spec and their tensor
    object: about a KiB each, within the cap (MAX_TENSORS: ~600 MiB and ~8 s at most on
    the 2-core dev VM), and never more for being empty."""
    count = 100_000
    reseal(folder(run, 200), TENSORS, zero_size_tensors(count))
    reseal(folder(run, 200), STATE, b"{}")
    for what in ("load", "verify"):
        found = measure(run, what)
        assert found["result"] == (200 if what == "load" else []), found
        assert found["grew_mib"] * 1024 / count < 2, found  # KiB per tensor
        assert found["s"] < 20, found
