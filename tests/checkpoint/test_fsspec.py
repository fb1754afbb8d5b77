"""CheckpointStore on fsspec object stores: ``memory://`` and ``s3://``.

The S3 tests talk to a real S3-compatible HTTP server (moto's server mode) on loopback, with
test credentials only: no real AWS configuration is read and nothing leaves the machine.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest
import safetensors.torch
import torch

import hardtrain.cli
from hardtrain import (
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    CheckpointStore,
    EventLog,
    NoCheckpointError,
)

MANIFEST = "MANIFEST.json"
TENSORS = "rank-00000.safetensors"
STATE = "rank-00000.json"

# Same-width integer dtypes, to compare floating-point tensors bit for bit (-0.0 vs 0.0).
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Every kind of tensor a training job saves, different for every seed."""
    g = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(3, 7, generator=g),
        "f64": torch.randn(4, 5, generator=g, dtype=torch.float64),
        "f16": torch.randn(11, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        # -0.0, infinities, a float32 subnormal and the largest finite value.
        "special": torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 3.4028235e38]),
        "i64": torch.randint(-(2**62), 2**62, (6,), generator=g, dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5,), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "mask": torch.randint(0, 2, (4, 4), generator=g).bool(),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(seed + 0.5, dtype=torch.bfloat16),  # 0-dim
        "step": torch.tensor(seed, dtype=torch.int64),  # 0-dim
        "empty": torch.empty(0, 4),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }


def make_state(seed: int) -> dict[str, Any]:
    return {
        "step": seed,
        "lr": 0.1 * seed,
        "name": f"run-{seed}",
        "nested": {"history": [1, 2.5, None, True, "x"], "empty": {}},
    }


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in tensors.items()}


def assert_bit_exact(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name
        if want.dtype in _BITS:
            bits = _BITS[want.dtype]
            assert torch.equal(got.view(bits), want.contiguous().view(bits)), name


def flip_byte(data: bytes, index: int = -1) -> bytes:
    damaged = bytearray(data)
    damaged[index] ^= 0x01
    return bytes(damaged)


def rejected_events(store: CheckpointStore) -> list[dict[str, Any]]:
    assert isinstance(store.events, EventLog)
    return [r for r in store.events.records if r["event"] == "checkpoint_rejected"]


# ------------------------------------------------------------------------------ memory://


@dataclass
class MemoryRun:
    url: str  # what CheckpointStore gets: memory://...
    path: str  # the same place as the memory filesystem names it
    fs: Any

    def file(self, step: int, name: str) -> str:
        return f"{self.path}/checkpoints/step-{step:08d}/{name}"


@pytest.fixture
def mem() -> Iterator[MemoryRun]:
    """A run folder of its own in the process-wide memory filesystem, removed after."""
    top = f"hardtrain-tests-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield MemoryRun(f"memory://{top}/run", f"/{top}/run", fs)
    if fs.exists(f"/{top}"):
        fs.rm(f"/{top}", recursive=True)


def test_memory_roundtrip_is_bit_exact(mem: MemoryRun) -> None:
    tensors, state = make_tensors(7), make_state(7)
    expected = snapshot(tensors)
    info = CheckpointStore(mem.url).save(7, tensors, state)
    assert info.committed and info.step == 7
    assert sorted(mem.fs.ls(f"{mem.path}/checkpoints/step-00000007", detail=False)) == [
        mem.file(7, MANIFEST), mem.file(7, STATE), mem.file(7, TENSORS),
    ]

    store = CheckpointStore(mem.url)  # a new process, resuming
    assert [(i.step, i.committed) for i in store.list()] == [(7, True)]
    report = store.verify(7)
    assert report.ok and report.num_files == 2 and report.ignored == ()
    loaded = store.load()
    assert loaded.step == 7
    assert loaded.state == state
    assert_bit_exact(loaded.tensors, expected)

    out = {k: torch.zeros_like(t) for k, t in expected.items()}
    filled = store.load(7, out=out)
    assert all(filled.tensors[k] is out[k] for k in out)  # filled in place
    assert_bit_exact(out, expected)


def test_memory_save_async(mem: MemoryRun) -> None:
    store = CheckpointStore(mem.url)
    tensors = make_tensors(1)
    expected = snapshot(tensors)
    store.save_async(1, tensors, make_state(1))
    for t in tensors.values():  # allowed once save_async returns: it copied them
        if t.dtype != torch.bool and t.numel():
            t.add_(1)
    info = store.wait()
    assert info is not None and info.committed and info.step == 1

    second = make_tensors(2)
    store.save_async(2, second, make_state(2))
    store.close()
    assert [i.step for i in store.list()] == [1, 2]

    fresh = CheckpointStore(mem.url)
    assert_bit_exact(fresh.load(1).tensors, expected)
    loaded = fresh.load()
    assert loaded.step == 2 and loaded.state == make_state(2)
    assert_bit_exact(loaded.tensors, make_tensors(2))


def test_memory_keep_last_prunes_old_checkpoints(mem: MemoryRun) -> None:
    store = CheckpointStore(mem.url, keep_last=2)
    for step in range(1, 6):
        store.save(step, make_tensors(step), make_state(step))
    assert [i.step for i in store.list(include_uncommitted=True)] == [4, 5]
    assert sorted(mem.fs.find(mem.path)) == sorted(
        mem.file(step, name) for step in (4, 5) for name in (MANIFEST, STATE, TENSORS)
    )
    pruned = [r["step"] for r in store.events.records if r["event"] == "checkpoint_pruned"]
    assert pruned == [1, 2, 3]
    loaded = CheckpointStore(mem.url).load()
    assert loaded.step == 5
    assert_bit_exact(loaded.tensors, make_tensors(5))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", [TENSORS, STATE])
def test_memory_damaged_file_is_detected_and_load_falls_back(
    mem: MemoryRun, name: str, damage: str
) -> None:
    store = CheckpointStore(mem.url)
    for step in (1, 2):
        store.save(step, make_tensors(step), make_state(step))
    path = mem.file(2, name)
    data = mem.fs.cat_file(path)
    mem.fs.pipe_file(path, flip_byte(data, len(data) // 2) if damage == "flip" else data[:-1])

    store = CheckpointStore(mem.url)
    assert store.verify(1).ok
    report = store.verify(2)
    assert not report.ok
    assert [(p.file, p.reason) for p in report.problems] == [
        (name, "wrong checksum" if damage == "flip" else "wrong size")
    ]
    with pytest.warns(CheckpointFallbackWarning, match=r"step-00000002.*" + name):
        loaded = store.load()
    assert loaded.step == 1
    assert loaded.state == make_state(1)
    assert_bit_exact(loaded.tensors, make_tensors(1))
    events = rejected_events(store)
    assert [(e["step"], e["file"]) for e in events] == [(2, name)]
    with pytest.raises(CheckpointCorruptError, match="step-00000002"):
        store.load(2)


# ---------------------------------------------------------------------------------- s3://

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/hardtrain-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/hardtrain-tests/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 for this module; test credentials only."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    werkzeug_log = logging.getLogger("werkzeug")
    old_level = werkzeug_log.level
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _AWS_ENV.items():
            mp.setenv(key, value)
        for key in _AWS_UNSET:
            mp.delenv(key, raising=False)
        werkzeug_log.setLevel(logging.WARNING)  # no line per request
        # Port 0: the OS picks a free port while the server binds it (no race).
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()  # none may point at the stopped server
            werkzeug_log.setLevel(old_level)


@dataclass
class S3Run:
    endpoint: str
    bucket: str
    url: str  # s3://bucket/run
    options: dict[str, Any]
    fs: Any  # an s3fs filesystem without listing cache, for reaching behind the store

    def key(self, step: int, name: str) -> str:
        return f"{self.bucket}/run/checkpoints/step-{step:08d}/{name}"

    def objects(self) -> list[str]:
        return sorted(self.fs.find(f"{self.bucket}/run/checkpoints"))


@pytest.fixture
def s3(s3_endpoint: str) -> S3Run:
    """A fresh bucket on the loopback server."""
    import boto3
    import s3fs

    bucket = f"hardtrain-{uuid.uuid4().hex[:16]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    return S3Run(s3_endpoint, bucket, f"s3://{bucket}/run", options, fs)


def test_s3_roundtrip_is_bit_exact(s3: S3Run) -> None:
    tensors, state = make_tensors(3), make_state(3)
    expected = snapshot(tensors)
    info = CheckpointStore(s3.url, storage_options=s3.options).save(3, tensors, state)
    assert info.committed and info.path == f"{s3.url}/checkpoints/step-00000003"
    assert s3.objects() == [s3.key(3, MANIFEST), s3.key(3, STATE), s3.key(3, TENSORS)]
    assert s3.fs.size(s3.key(3, TENSORS)) + s3.fs.size(s3.key(3, STATE)) == info.num_bytes

    store = CheckpointStore(s3.url, storage_options=s3.options)
    assert store.verify(3).ok
    loaded = store.load()
    assert loaded.step == 3 and loaded.state == state
    assert_bit_exact(loaded.tensors, expected)


def test_s3_save_async_and_wait(s3: S3Run) -> None:
    store = CheckpointStore(s3.url, storage_options=s3.options)
    tensors = make_tensors(1)
    expected = snapshot(tensors)
    store.save_async(1, tensors, make_state(1))
    for t in tensors.values():
        t.zero_()
    info = store.wait()
    assert info is not None and info.committed and info.step == 1
    store.save_async(2, make_tensors(2), make_state(2))
    assert store.wait() is not None
    store.close()

    fresh = CheckpointStore(s3.url, storage_options=s3.options)
    assert [i.step for i in fresh.list()] == [1, 2]
    assert_bit_exact(fresh.load(1).tensors, expected)
    loaded = fresh.load()
    assert loaded.step == 2
    assert_bit_exact(loaded.tensors, make_tensors(2))


def test_s3_list_shows_committed_only(s3: S3Run) -> None:
    store = CheckpointStore(s3.url, storage_options=s3.options)
    store.save(1, make_tensors(1), make_state(1))
    # A save that died before its manifest: data objects, no MANIFEST.json.
    s3.fs.pipe_file(s3.key(2, TENSORS), safetensors.torch.save({"w": torch.ones(3)}))
    s3.fs.pipe_file(s3.key(2, STATE), b"{}")

    store = CheckpointStore(s3.url, storage_options=s3.options)
    assert [i.step for i in store.list()] == [1]
    assert [(i.step, i.committed) for i in store.list(include_uncommitted=True)] == [
        (1, True), (2, False),
    ]
    assert [(p.file, p.reason) for p in store.verify(2).problems] == [(MANIFEST, "not committed")]
    latest = store.latest()
    assert latest is not None and latest.step == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointFallbackWarning)  # nothing to reject
        loaded = store.load()
    assert loaded.step == 1
    assert_bit_exact(loaded.tensors, make_tensors(1))

    # The next commit clears the leftovers of the dead save (its own rank files only).
    store.save(3, make_tensors(3), make_state(3))
    assert [key.rsplit("/", 2)[-2] for key in s3.objects()] == ["step-00000001"] * 3 + [
        "step-00000003"
    ] * 3


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_s3_damaged_object_falls_back(s3: S3Run, damage: str) -> None:
    store = CheckpointStore(s3.url, storage_options=s3.options)
    for step in (1, 2, 3):
        store.save(step, make_tensors(step), make_state(step))
    data = s3.fs.cat_file(s3.key(3, TENSORS))
    s3.fs.pipe_file(
        s3.key(3, TENSORS), flip_byte(data, len(data) // 2) if damage == "flip" else data[:-7]
    )

    store = CheckpointStore(s3.url, storage_options=s3.options)
    report = store.verify(3)
    reason = "wrong checksum" if damage == "flip" else "wrong size"
    assert [(p.file, p.reason) for p in report.problems] == [(TENSORS, reason)]
    with pytest.warns(CheckpointFallbackWarning, match="step-00000003"):
        loaded = store.load()
    assert loaded.step == 2 and loaded.state == make_state(2)
    assert_bit_exact(loaded.tensors, make_tensors(2))
    assert [(e["step"], e["file"]) for e in rejected_events(store)] == [(3, TENSORS)]


def test_s3_missing_manifest_of_newest_falls_back(s3: S3Run) -> None:
    store = CheckpointStore(s3.url, storage_options=s3.options)
    for step in (1, 2):
        store.save(step, make_tensors(step), make_state(step))
    s3.fs.rm_file(s3.key(2, MANIFEST))

    store = CheckpointStore(s3.url, storage_options=s3.options)
    assert [i.step for i in store.list()] == [1]
    assert not store.verify(2).ok
    loaded = store.load()
    assert loaded.step == 1
    assert_bit_exact(loaded.tensors, make_tensors(1))
    with pytest.raises(NoCheckpointError, match="for step 2"):
        store.load(2)  # uncommitted: there is no checkpoint for step 2


def test_s3_keep_last_prunes_old_objects(s3: S3Run) -> None:
    store = CheckpointStore(s3.url, keep_last=2, storage_options=s3.options)
    for step in range(1, 5):
        store.save(step, make_tensors(step), make_state(step))
    assert [i.step for i in store.list(include_uncommitted=True)] == [3, 4]
    assert s3.objects() == sorted(
        s3.key(step, name) for step in (3, 4) for name in (MANIFEST, STATE, TENSORS)
    )
    loaded = CheckpointStore(s3.url, storage_options=s3.options).load()
    assert loaded.step == 4
    assert_bit_exact(loaded.tensors, make_tensors(4))


def test_s3_cli_verify_with_endpoint_from_env(
    s3: S3Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI takes no storage_options: the endpoint comes from AWS_ENDPOINT_URL."""
    import botocore
    import s3fs

    version = tuple(int(x) for x in botocore.__version__.split(".")[:2])
    if version < (1, 31):
        pytest.skip(f"botocore {botocore.__version__} ignores AWS_ENDPOINT_URL (needs >= 1.31)")
    store = CheckpointStore(s3.url, storage_options=s3.options)
    for step in (1, 2):
        store.save(step, make_tensors(step), make_state(step))

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    # A cached no-options S3 filesystem would keep the endpoint it was made with.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert hardtrain.cli.main(["verify", s3.url]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out == [
            f"{s3.url}/checkpoints/step-00000001: ok",
            f"{s3.url}/checkpoints/step-00000002: ok",
            "all 2 checkpoint(s) verified",
        ]

        data = s3.fs.cat_file(s3.key(2, TENSORS))
        s3.fs.pipe_file(s3.key(2, TENSORS), flip_byte(data))
        assert hardtrain.cli.main(["verify", s3.url]) == 1
        out = capsys.readouterr().out
        assert f"{s3.url}/checkpoints/step-00000002: FAILED" in out
        assert f"  {TENSORS}: wrong checksum" in out

        assert hardtrain.cli.main(["ls", s3.url]) == 1
        captured = capsys.readouterr()
        rows = captured.out.splitlines()[1:]
        assert [row.split()[0] for row in rows] == ["1", "2"]
        assert rows[0].endswith(" verified")
        assert "BAD: " in rows[1] and "wrong checksum" in rows[1]

        missing = f"s3://{s3.bucket}-missing/run"
        assert hardtrain.cli.main(["verify", missing]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("hardtrain:"), err
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
