"""capture_metadata: git, config, versions, hardware (NVML through a fake), redaction."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht
import hardtrain.metadata as metadata_module
from hardtrain import _probes
from hardtrain._redact import REDACTED, is_secret_name, redact, redact_text
from hardtrain.metadata import DIFF_FILE, METADATA_FILE, metadata_changes, metadata_files
from tests.gitrepo import git, new_repo

GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5" * 4
HF_TOKEN = "hf_" + "Zy9Xw8Vu7T" * 4


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with one commit, a credentialed remote, and a dirty tree: an unstaged
    change, a staged new file and an untracked file."""
    root = new_repo(tmp_path / "repo")
    git(root, "remote", "add", "origin", f"https://alice:{GITHUB_TOKEN}@github.com/org/repo.git")
    # lines with secret-looking words that are code: the patch must still apply
    (root / "train.py").write_text("lr = 0.2\nbest = sorted(xs, key=len)\n"
                                   "token_ids = tok(text, max_tokens=2048)\n")
    (root / "staged.py").write_text("print('staged')\n")
    git(root, "add", "staged.py")
    (root / "notes.txt").write_text("untracked\n")
    return root


def test_git_state_of_a_dirty_tree(repo: Path) -> None:
    meta = ht.capture_metadata(repo=repo)
    g = meta["git"]
    assert g["available"] is True
    assert g["commit"] == git(repo, "rev-parse", "HEAD")
    assert (g["branch"], g["detached"], g["dirty"]) == ("main", False, True)
    assert g["untracked"] == ["notes.txt"] and g["num_untracked"] == 1
    assert "-lr = 0.1" in g["diff"] and "+lr = 0.2" in g["diff"]
    assert "+print('staged')" in g["diff"]  # staged changes count too
    assert g["remote"] == "https://github.com/org/repo.git"  # credentials stripped
    files = metadata_files(meta)
    assert files[DIFF_FILE].decode() == g["diff"]
    on_disk = json.loads(files[METADATA_FILE])
    assert "diff" not in on_disk["git"] and on_disk["git"]["diff_file"] == DIFF_FILE
    # the patch applies to the commit it was taken against
    git(repo, "stash", "-q")
    (repo / "x.patch").write_bytes(files[DIFF_FILE])
    git(repo, "apply", "--check", "x.patch")


def test_a_file_that_is_not_utf8_comes_back_byte_for_byte(repo: Path) -> None:
    (repo / "latin1.py").write_bytes(b'name = "caf\xe9"\n')
    git(repo, "add", "latin1.py")
    git(repo, "commit", "-q", "-m", "latin-1")
    (repo / "latin1.py").write_bytes(b'name = "caf\xe9 cr\xe8me"\n')
    meta = ht.capture_metadata(repo=repo)
    patch = metadata_files(meta)[DIFF_FILE]
    raw = subprocess.run(["git", "-C", str(repo), "diff", "HEAD", "--binary"], check=True,
                         capture_output=True).stdout
    assert patch == raw
    assert meta["git"]["diff_sha256"] == hashlib.sha256(raw).hexdigest()
    json.dumps(meta)


def test_a_huge_diff_is_cut_and_says_so(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_probes, "MAX_DIFF_BYTES", 100)
    g = ht.capture_metadata(repo=repo)["git"]
    assert g["diff_truncated"] is True and len(g["diff"].encode()) == 100
    assert g["diff_bytes"] > 100


def test_git_detached_head_and_a_clean_tree(repo: Path) -> None:
    git(repo, "stash", "-q", "-u")
    git(repo, "checkout", "-q", git(repo, "rev-parse", "HEAD"))
    g = ht.capture_metadata(repo=repo)["git"]
    assert (g["detached"], g["branch"], g["dirty"], g["diff"]) == (True, None, False, "")
    assert g["diff_sha256"] is None


def test_not_a_git_repository(tmp_path: Path) -> None:
    meta = ht.capture_metadata({"lr": 1}, repo=tmp_path)
    assert meta["git"] == {"available": False,
                           "reason": f"{tmp_path} is not inside a git repository"}
    assert meta["config"] == {"lr": 1} and meta["versions"]["torch"] == torch.__version__


def test_no_git_executable_at_all(repo: Path, tmp_path: Path) -> None:
    """GitPython cannot even be imported without git: the metadata says so, the rest is
    captured, and a trainer still checkpoints."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    code = (
        "import json, sys, torch, hardtrain as ht\n"
        f"meta = ht.capture_metadata(repo={str(repo)!r})\n"
        "model = torch.nn.Linear(2, 1)\n"
        "t = ht.HardenedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),\n"
        "    [torch.ones(2)] * 2, sys.argv[1], checkpoint=ht.CheckpointPolicy(every_steps=1),\n"
        f"    metadata=ht.MetadataPolicy(repo={str(repo)!r}))\n"
        "t.fit(lambda b: model(b).sum(), max_steps=2)\n"
        "print(json.dumps(meta['git']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["PATH"] = str(empty)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env,
                         check=True, capture_output=True, text=True).stdout
    g = json.loads(out.splitlines()[-1])
    assert g["available"] is False and "git is not usable" in g["reason"]
    saved = json.loads((tmp_path / "run/checkpoints/step-00000002/run.json").read_text())
    assert saved["git"]["available"] is False and saved["versions"]["torch"]


def test_config_shapes_become_json() -> None:
    @dataclasses.dataclass
    class Optim:
        lr: float = 3e-4
        betas: tuple[float, float] = (0.9, 0.95)

    @dataclasses.dataclass
    class Config:
        name: str = "gpt"
        optim: Optim = dataclasses.field(default_factory=Optim)
        out: Path = Path("/runs/x")
        dtype: torch.dtype = torch.bfloat16
        tags: frozenset[str] = frozenset({"b", "a"})

    assert ht.capture_metadata(Config())["config"] == {
        "name": "gpt", "optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "out": "/runs/x",
        "dtype": "torch.bfloat16", "tags": ["a", "b"],
    }
    namespace = argparse.Namespace(lr=0.1, steps=10, resume=None)
    assert ht.capture_metadata(namespace)["config"] == {"lr": 0.1, "steps": 10, "resume": None}
    json.dumps(ht.capture_metadata({1: object(), "deep": [[{"x": {1, 2}}]]}))


def test_seed_versions_hardware_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("UNRELATED_THING", "x")
    meta = ht.capture_metadata(seed=7)
    assert meta["determinism"]["seed"] == 7
    assert meta["determinism"]["use_deterministic_algorithms"] is False
    assert meta["env"]["NCCL_ALGO"] == "Tree" and meta["env"]["OMP_NUM_THREADS"] == "2"
    assert "UNRELATED_THING" not in meta["env"]
    assert meta["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["packages"]["torch"] == torch.__version__
    assert meta["hardware"]["cpu"]["logical_cores"] >= 1
    assert meta["hardware"]["memory_bytes"] > 0
    assert meta["world"] == {"world_size": 1, "ranks": [
        {"rank": 0, "host": meta["host"]["hostname"], "pid": os.getpid(),
         "local_rank": meta["world"]["ranks"][0]["local_rank"], "device": None}]}
    assert meta["command"]["argv"][0] == sys.argv[0]


class FakeNVML:
    """pynvml's functions over two GPUs; the second has no ECC support (consumer card)."""

    class NotSupported(Exception):
        pass

    def __init__(self, *, init_error: Exception | None = None) -> None:
        self.init_error = init_error
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"][handle]

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-0000000{handle}-aaaa-bbbb-cccc-dddddddddddd"

    def nvmlDeviceGetVbiosVersion(self, handle: int) -> str:
        return "96.00.89.00.01"

    def nvmlDeviceGetEccMode(self, handle: int) -> tuple[int, int]:
        if handle == 1:
            raise self.NotSupported()
        return (1, 1)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return argparse.Namespace(total=80 * 2**30)


def test_gpus_through_nvml() -> None:
    nvml = FakeNVML()
    gpus = ht.capture_metadata(nvml=nvml)["hardware"]["gpus"]
    assert nvml.shut_down
    assert gpus["available"] is True and gpus["driver"] == "550.54.15"
    first, second = gpus["devices"]
    assert first == {"index": 0, "name": "NVIDIA H100 80GB HBM3",
                     "uuid": "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
                     "vbios": "96.00.89.00.01", "ecc_mode": "enabled",
                     "memory_bytes": 80 * 2**30}
    assert second["ecc_mode"] == "unavailable: NotSupported"


def test_gpus_unavailable_say_why() -> None:
    gpus = ht.capture_metadata(nvml=FakeNVML(init_error=OSError("libnvidia-ml.so.1: no such "
                                                                "file")))["hardware"]["gpus"]
    assert gpus == {"available": False,
                    "reason": "NVML: OSError: libnvidia-ml.so.1: no such file"}


# ----------------------------------------------------------------------------- secrets


SECRET_ENV = {
    "HF_TOKEN": HF_TOKEN,
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "MY_DB_PASSWORD": "correct-horse-battery",
    "NCCL_IB_AUTH_TOKEN": "nccl-side-secret-123",  # a captured prefix, a secret name
}
CONFIG_SECRET = "cfg-secret-value-42"


def test_secrets_never_reach_the_metadata(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    # the secrets also turn up in the uncommitted diff, the command line and the config
    (repo / "train.py").write_text(f"lr = 0.2\nkey = '{SECRET_ENV['MY_DB_PASSWORD']}'\n"
                                   f"s3 = 'https://bob:{CONFIG_SECRET}@minio:9000'\n")
    monkeypatch.setattr(sys, "argv", ["train.py", "--api-key", "argv-secret-1",
                                      f"--hub-token={HF_TOKEN}", "--lr", "0.1",
                                      "--db-password=correcthorsebatterystaple",
                                      "--hub-token=abcdefghijklmnop", "--text-column", "text",
                                      "--admin-password", "123456", "--key-dim", "64"])
    config = {"lr": 0.1, "wandb": {"api_key": CONFIG_SECRET, "project": "p"},
              "key_dim": 64, "max_tokens": 2048, "tokenizer": "gpt2",
              "pad_token": "<pad>", "text_key": "text", "hub": {"token": "0123abcd4567efgh"},
              "data_url": "https://user:pa55word@data.example.com/x",
              "note": f"pushed with {GITHUB_TOKEN}"}
    meta = ht.capture_metadata(config, repo=repo)
    written = b"".join(metadata_files(meta).values())
    for secret in [*SECRET_ENV.values(), CONFIG_SECRET, "argv-secret-1", "pa55word",
                   GITHUB_TOKEN, "correcthorsebatterystaple", "abcdefghijklmnop",
                   "0123abcd4567efgh"]:
        assert secret.encode() not in written, secret
    assert meta["config"]["wandb"] == {"api_key": REDACTED, "project": "p"}
    # weak names (token, key) keep values that do not look like credentials
    assert (meta["config"]["key_dim"], meta["config"]["max_tokens"], meta["config"]["tokenizer"],
            meta["config"]["pad_token"], meta["config"]["text_key"]) == (
        64, 2048, "gpt2", "<pad>", "text")
    assert meta["config"]["hub"] == {"token": REDACTED}
    assert meta["env"]["NCCL_IB_AUTH_TOKEN"] == REDACTED
    assert meta["command"]["argv"] == ["train.py", "--api-key", REDACTED,
                                       f"--hub-token={REDACTED}", "--lr", "0.1",
                                       f"--db-password={REDACTED}", f"--hub-token={REDACTED}",
                                       "--text-column", "text", "--admin-password", REDACTED,
                                       "--key-dim", "64"]
    assert "+lr = 0.2" in meta["git"]["diff"]  # the rest of the diff is intact


@pytest.mark.parametrize("name,secret", [
    ("HF_TOKEN", True), ("GITHUB_TOKEN", True), ("apiKey", True), ("db-password", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("AZURE_STORAGE_CONNECTION_STRING", True),
    ("Authorization", True), ("SENTRY_DSN", True), ("MYAPIKEY", True),
    ("max_tokens", False), ("tokenizer", False), ("author", False), ("NCCL_ALGO", False),
    ("TOKENIZERS_PARALLELISM", False), ("PWD", False), ("monkey", False),
])
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


@pytest.mark.parametrize("text", [
    "s3://AKIAIOSFODNN7EXAMPLE:abc@bucket/x",
    f"git clone https://x-access-token:{GITHUB_TOKEN}@github.com/o/r",
    f"https://{GITHUB_TOKEN}@github.com/o/r",
    "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
    "token xoxb-123456789012-abcdefghijkl",
    "key sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
    "glpat-abcdefghij0123456789",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
    'client_secret = "s3cr3t-value"', "PASSWORD=hunter22 ./run", "--api-key=abc123def",
    "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    "redis://:passw0rd@cache:6379/0", "postgres://app:p@ss@db:5432/x",
    "admin_password: letmeinplease",
])
def test_credential_shapes_are_cut(text: str) -> None:
    out = redact_text(text)
    assert REDACTED in out
    for piece in ("abc@", "ghp_", "abcdefghijklmnop", "xoxb-1", "sk-ant", "glpat-", "eyJzdWIi",
                  "MIIEpA", "s3cr3t", "hunter22", "abc123def", "AIzaSy", "passw0rd", "ss@db",
                  "letmein"):
        assert piece not in out, (text, out)


@pytest.mark.parametrize("text", [
    "max_tokens=2048", "tokenizer = AutoTokenizer.from_pretrained('gpt2')",
    "key_dim: 64", "api_key = os.environ['WANDB_API_KEY']", "/data/runs/exp1/step-00001200",
    "ssh://github.com/org/repo.git", "https://github.com/org/repo.git", "loss=0.25 lr=1e-3",
    "sorted(xs, key=len)", "token_ids = tok(x)", 'batch.get(key="input_ids")',
    "auth = HTTPBasicAuth(user, pw)", "pass_rate = 0.95",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_known_values_are_cut_anywhere() -> None:
    assert redact_text("dir /x/sekrit-value-9/y", ["sekrit-value-9"]) == f"dir /x/{REDACTED}/y"
    assert redact({"a": ["sekrit-value-9 here"], "token": 5, "password": None},
                  ["sekrit-value-9"]) == {"a": [f"{REDACTED} here"], "token": 5,
                                          "password": None}


def test_events_and_errors_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    log = ht.EventLog(tmp_path / "events.jsonl")
    with caplog.at_level(logging.INFO, logger="hardtrain"):
        log.record("logs_upload_failed", error=f"403 for https://u:pw-123456@host/{HF_TOKEN}",
                   api_key="abcdefghijkl")
    text = (tmp_path / "events.jsonl").read_text() + caplog.text
    for secret in (HF_TOKEN, "pw-123456", "abcdefghijkl"):
        assert secret not in text
    assert "logs_upload_failed" in text
    error = ht.CheckpointError(f"cannot open s3://key:{HF_TOKEN}@bucket/run")
    assert HF_TOKEN not in str(error) and "s3://" in str(error)


# ----------------------------------------------------------------------------- compare


def test_changes_that_break_exactness_come_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    old = ht.capture_metadata({"lr": 0.1}, nvml=FakeNVML())
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    new = ht.capture_metadata({"lr": 0.1}, nvml=FakeNVML())
    new["host"]["hostname"] = "elsewhere"  # expected to differ: not reported
    new["packages"]["torch"] = "9.9.9"
    new["packages"]["newpkg"] = "1.0"
    changes = metadata_changes(old, new)
    breaking = [c for c in changes if c.breaks_exactness]
    assert [(c.field, c.old, c.new) for c in breaking] == [
        ("env.NCCL_ALGO", None, "Ring"),
        ("versions.torch", old["versions"]["torch"], "9.9.9"),
    ]
    assert {c.field for c in changes if not c.breaks_exactness} == {"packages.newpkg",
                                                                    "packages.torch"}
    assert str(breaking[1]) == f'versions.torch: "{old["versions"]["torch"]}" -> "9.9.9"'
    assert metadata_changes(old, old) == []


def test_a_config_that_reads_differently_in_each_process_is_not_a_change() -> None:
    def config() -> dict[str, Any]:
        return {"eps": float("nan"), "loss": object(), "act": torch.nn.GELU}

    old, new = ht.capture_metadata(config()), ht.capture_metadata(config())
    assert old["config"]["loss"] == "<object object>"
    assert metadata_changes(json.loads(json.dumps(old)), new) == []


def test_a_probe_that_could_not_run_is_not_a_change() -> None:
    old = ht.capture_metadata(nvml=FakeNVML())
    new = ht.capture_metadata(nvml=FakeNVML(init_error=OSError("driver/library mismatch")))
    changes = metadata_changes(old, new)
    assert [c for c in changes if c.breaks_exactness] == []
    models = next(c for c in changes if c.field == "hardware.gpus.models")
    assert models.old == ["NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3"]
    assert models.new == metadata_module.UNKNOWN
    # with the probe working on both sides, another GPU model does break exactness
    other = ht.capture_metadata(nvml=FakeNVML())
    other["hardware"]["gpus"]["devices"][1]["name"] = "NVIDIA A100-SXM4-80GB"
    assert [c.field for c in metadata_changes(old, other) if c.breaks_exactness] == [
        "hardware.gpus.models"]


def test_a_cyclic_config_does_not_break_the_capture() -> None:
    config: dict[str, Any] = {"lr": 0.1}
    config["me"] = config
    meta = ht.capture_metadata(config)
    assert meta["config"]["lr"] == 0.1
    json.dumps(meta)


def test_policy_checks_itself() -> None:
    assert ht.MetadataPolicy().on_change == "warn"
    with pytest.raises(ValueError, match="on_change='ignore'"):
        ht.MetadataPolicy(on_change="ignore")
    with pytest.raises(TypeError):
        ht.MetadataPolicy("refuse")  # type: ignore[misc]

