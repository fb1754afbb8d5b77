"""Run metadata: which code, config, machine, versions and environment a run used.

``capture_metadata`` collects it as one JSON-safe dict, secrets redacted; the trainer
writes it as ``run.json`` (and the uncommitted diff as ``git-diff.patch``) into every
checkpoint, and on resume compares it with the checkpoint's (``metadata_changes``).
``MetadataPolicy`` decides what a change that breaks bit-exactness does.

Every part that cannot be read (no git, not a repository, no NVML) says why in the
metadata, and the run goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil

from hardtrain import _dist, _probes
from hardtrain._redact import (
    REDACTED,
    is_secret_name,
    known_secrets,
    redact,
    redact_argv,
    secret_values,
)

__all__ = [
    "DIFF_FILE",
    "METADATA_FILE",
    "EnvironmentChangedWarning",
    "MetadataChange",
    "MetadataPolicy",
    "capture_metadata",
    "metadata_changes",
    "metadata_files",
]

METADATA_FILE = "run.json"
UNKNOWN = "<unavailable>"  # a part that could not be read (no git, no NVML)
DIFF_FILE = "git-diff.patch"
FORMAT = 1
# Environment variables that change numerics, communication or scheduling, by prefix or name.
_ENV_PREFIXES = (
    "NCCL_", "TORCH_", "PYTORCH_", "CUDA_", "CUBLAS_", "CUBLASLT_", "CUDNN_", "NVIDIA_",
    "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "GLOO_", "UCX_", "FI_", "NVTE_",
    "SLURM_", "TORCHELASTIC_", "XLA_", "HIP_", "ROCM_", "HSA_", "MIOPEN_",
)
_ENV_NAMES = frozenset({
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "PYTHONHASHSEED", "TOKENIZERS_PARALLELISM",
})
# Environment variables whose change breaks bit-exactness (CUBLAS_WORKSPACE_CONFIG is
# under determinism; which GPU each rank uses, under world.devices).
_EXACTNESS_ENV = frozenset({
    "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "MKL_CBWR", "PYTHONHASHSEED",
})
_INFORMATIONAL = ("determinism.seed", "git.branch", "git.remote", "hardware.gpus.driver",
                  "hardware.memory_bytes")  # reported when they differ, never breaking
_EXACTNESS_NCCL = ("NCCL_ALGO", "NCCL_PROTO", "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS",
                   "NCCL_NTHREADS", "NCCL_BUFFSIZE", "NCCL_CROSS_NIC", "NCCL_COLLNET_ENABLE",
                   "NCCL_NVLS_ENABLE", "NCCL_TREE_THRESHOLD", "NCCL_LL_THRESHOLD")


@dataclass(frozen=True, kw_only=True)
class MetadataPolicy:
    """Run metadata in every checkpoint, and what a changed environment does on resume.
    Pass ``metadata=None`` to the trainer for no ``run.json`` and no comparison.

    on_change: "warn" (a warning, a log line and an ``environment_changed`` event naming
        every old and new value, then the resume goes on) or "refuse" (raise
        ``ht.EnvironmentChangedError`` before anything goes into the model, optimizer or
        data) when something that breaks bit-exactness changed since the checkpoint:
        torch/CUDA/cuDNN/NCCL/Python versions, world size, each rank's GPU (or the GPU or
        CPU model), determinism flags (CUBLAS_WORKSPACE_CONFIG included), numerics
        environment variables (NCCL_ALGO, OMP_NUM_THREADS, ...), the code (git commit or
        uncommitted diff) or the config (each changed key named). "refuse" also refuses a
        checkpoint whose run.json is missing or unreadable: nothing vouches for it.
    repo: a folder inside the git repository to describe; None: the training script's
        folder (``sys.argv[0]``), or the current directory when there is no script file.
    """

    on_change: str = "warn"
    repo: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.on_change not in ("warn", "refuse"):
            raise ValueError(f"on_change={self.on_change!r}: must be 'warn' or 'refuse'")
        if self.repo is not None and not isinstance(self.repo, str | os.PathLike):
            raise TypeError(f"repo={self.repo!r}: must be a path, or None for the training "
                            "script's folder")


class EnvironmentChangedWarning(UserWarning):
    """A run resumed with something that breaks bit-exactness changed since its checkpoint
    (``MetadataPolicy(on_change="warn")``). See runbooks/environment-changed.md."""


@dataclass(frozen=True)
class MetadataChange:
    """One difference between a checkpoint's metadata and now.

    field: dotted path in run.json ("versions.torch", "env.NCCL_ALGO").
    old, new: the values (None where absent).
    breaks_exactness: a change of this field can change the numbers a resumed run computes.
    """

    field: str
    old: Any
    new: Any
    breaks_exactness: bool

    def __str__(self) -> str:
        return f"{self.field}: {_short(self.old)} -> {_short(self.new)}"

    def as_json(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new,
                "breaks_exactness": self.breaks_exactness}


def capture_metadata(
    config: Any = None,
    *,
    seed: int | None = None,
    repo: str | os.PathLike[str] | None = None,
    nvml: Any = None,
) -> dict[str, Any]:
    """Everything needed to tell later which code, config, machine and software a run
    used, as one JSON-safe dict with every secret redacted (``hardtrain._redact``).

    Collective when torch.distributed is initialised: every rank must call it (one small
    all-gather of each rank's host); each rank gets the whole dict.

    config: a dict, dataclass, argparse Namespace or pydantic model; made JSON-safe.
    seed: the run's seed, recorded with the determinism flags.
    repo: a folder inside the git repository; None: the training script's folder
        (``sys.argv[0]``), or the current directory.
    nvml: an object with pynvml's functions (a seam for tests); None imports pynvml.

    The git diff of uncommitted changes is under ``git.diff`` (``metadata_files`` writes
    it as its own file). Parts that cannot be read hold ``{"available": False, "reason":
    ...}``; capturing never raises for them.
    """
    # the control group: the default group may be NCCL, which needs GPU tensors
    return capture(config, seed=seed, repo=repo, nvml=nvml,
                   group=_dist.groups.get(_dist.CONTROL))


def capture(
    config: Any,
    *,
    seed: int | None,
    repo: str | os.PathLike[str] | None,
    nvml: Any,
    group: Any,
    full: bool = True,
) -> dict[str, Any]:
    """``capture_metadata`` on a given gloo ``group`` (the trainer's own). ``full=False``
    takes part in the all-gather and returns only ``world`` (the trainer's ranks other
    than 0, whose metadata nobody writes)."""
    rank, world_size = _dist.rank_and_world_size()
    me = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
          "local_rank": _int_or_none(os.environ.get("LOCAL_RANK")), "device": _probes.device()}
    world = {"world_size": world_size,
             "ranks": _dist.all_gather_json(me, group)}
    if not full:
        return {"format": FORMAT, "world": world}
    known = known_secrets()
    found = _part(secret_values, config)  # strings under secret config keys, cut anywhere
    known |= found if isinstance(found, set) else set()
    metadata = {
        "format": FORMAT,
        "captured_at": _iso(time.time()),
        "process_started_at": _part(lambda: _iso(psutil.Process().create_time())),
        "command": {"argv": redact_argv(sys.argv, known), "executable": sys.executable,
                    "cwd": _part(os.getcwd)},
        "host": {"hostname": socket.gethostname(), "platform": platform.platform()},
        "world": world,
        "git": _part(_probes.git_state, repo),
        "config": _part(redact, config, known),  # a config whose str() raises is a reason
        "versions": _part(_probes.versions),
        "hardware": {"cpu": _part(_probes.cpu), "memory_bytes": _part(_probes.memory_bytes),
                     "gpus": _part(_probes.gpus, nvml)},
        "determinism": _part(_probes.determinism, seed),
        "env": {k: (REDACTED if is_secret_name(k) else v) for k, v in sorted(os.environ.items())
                if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES},
    }
    redacted: dict[str, Any] = redact(metadata, known)
    redacted["packages"] = _part(_probes.packages)  # names and versions: nothing to redact
    return redacted


def _part(read: Any, *args: Any) -> Any:
    """One part of the metadata, or why it could not be read: capturing never raises."""
    try:
        return read(*args)
    except Exception as e:
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}


def metadata_files(metadata: Mapping[str, Any]) -> dict[str, bytes]:
    """The files that hold ``metadata`` in a checkpoint: ``run.json``, and
    ``git-diff.patch`` when there are uncommitted changes (``git apply`` takes it)."""
    body = json.loads(json.dumps(metadata))  # a deep copy
    files = {}
    git = body.get("git") or {}
    diff = git.pop("diff", None)
    if diff:
        files[DIFF_FILE] = diff.encode("utf-8", "surrogateescape")  # bytes as git gave them
        git["diff_file"] = DIFF_FILE
    files[METADATA_FILE] = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()
    return files


def metadata_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[MetadataChange]:
    """What differs between two captures (``old`` from a checkpoint, ``new`` from now):
    every field that differs, those that break bit-exactness first, then informational
    ones (seed, branch, remote, driver, memory, the ranks' hosts, packages). Times,
    process ids, the command and GPU serial numbers are expected to differ: left out."""
    changes = []
    flat_old, flat_new = _exactness_view(old), _exactness_view(new)
    for key in sorted(flat_old.keys() | flat_new.keys()):
        before, after = flat_old.get(key), flat_new.get(key)
        if not _same(before, after):  # unknown on one side: shown, but not counted
            changes.append(MetadataChange(key, before, after, UNKNOWN not in (before, after)))
    changes.sort(key=lambda c: not c.breaks_exactness)
    informational = {key: (_get(old, key), _get(new, key)) for key in _INFORMATIONAL}
    informational["world.hosts"] = (_hosts(old), _hosts(new))
    old_packages, new_packages = old.get("packages") or {}, new.get("packages") or {}
    for name in sorted(old_packages.keys() | new_packages.keys()):
        informational[f"packages.{name}"] = (old_packages.get(name), new_packages.get(name))
    changes += [MetadataChange(key, before, after, False)
                for key, (before, after) in informational.items() if not _same(before, after)]
    return changes


# ------------------------------------------------------------------------------- parts


def _exactness_view(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The fields whose change can change the numbers, flattened to dotted names."""
    view: dict[str, Any] = {
        "versions." + k: v for k, v in (metadata.get("versions") or {}).items()
        if k in ("torch", "cuda", "cudnn", "nccl", "hip", "python", "numpy", "hardtrain")
    }
    view["world.world_size"] = _get(metadata, "world.world_size")
    devices = [r.get("device") for r in _get(metadata, "world.ranks") or []]
    view["world.devices"] = devices  # each rank's GPU: what the job computes on
    # Without CUDA in use yet: the GPUs NVML lists, or (none) the CPU, whose kernels
    # (AVX-512 or not) decide the numbers. UNKNOWN where not compared, or where the probe
    # could not run: compared, it would always "change".
    gpus = _get(metadata, "hardware.gpus")
    models: Any = UNKNOWN
    if not any(devices) and isinstance(gpus, Mapping) and gpus.get("available") is True:
        models = sorted(str(g.get("name")) for g in gpus.get("devices") or [])
    view["hardware.gpus.models"] = models
    cpu_counts = not any(devices) and (models == UNKNOWN or not models)
    view["hardware.cpu.model"] = (_get(metadata, "hardware.cpu.model") or UNKNOWN) \
        if cpu_counts else UNKNOWN
    view.update({"determinism." + k: v for k, v in (metadata.get("determinism") or {}).items()
                 if k != "seed"})  # the seed only acts at a fresh start
    env = metadata.get("env") or {}
    for name in sorted(_EXACTNESS_ENV | set(_EXACTNESS_NCCL)):
        view["env." + name] = env.get(name)
    git_known = _get(metadata, "git.available") is True
    view["git.commit"] = _get(metadata, "git.commit") if git_known else UNKNOWN
    view["git.diff_sha256"] = _get(metadata, "git.diff_sha256") if git_known else UNKNOWN
    config = metadata.get("config")
    view.update(_flatten(config, "config") if isinstance(config, dict) and config else
                {"config": config})
    return view


def _flatten(node: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"config.a.b": 1}``: each changed key is named alone."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def _get(metadata: Mapping[str, Any], path: str) -> Any:
    node: Any = metadata
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _hosts(metadata: Mapping[str, Any]) -> list[str]:
    return sorted({str(r.get("host")) for r in _get(metadata, "world.ranks") or []})


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat()


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (so that nan equals nan, as it does in the file)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."

