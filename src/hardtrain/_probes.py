"""What the run metadata reads from the machine, each part on its own: git (GitPython),
versions, installed packages, the CPU and memory (psutil), the GPUs (NVML through
nvidia-ml-py, by ``hardtrain._nvml``: the seam tests fake, shared with the health
probes), this process's CUDA device and the determinism flags. Each returns JSON-safe
values or raises; ``hardtrain.metadata`` turns a raise into ``{"available": False,
"reason": ...}``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import sys
import urllib.parse
from typing import Any

import psutil
import torch

from hardtrain import _nvml
from hardtrain._version import __version__
from hardtrain.determinism import determinism_flags

MAX_UNTRACKED = 200  # untracked file names listed; the count is always there
MAX_DIFF_BYTES = 2 * 2**20  # larger diffs are cut (redaction reads ~2 MB/s), and say so


def determinism(seed: int | None) -> dict[str, Any]:
    return {"seed": seed, **determinism_flags(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def git_state(repo: str | os.PathLike[str] | None) -> dict[str, Any]:
    where = os.path.abspath(os.fspath(repo)) if repo is not None else _script_dir()
    try:
        import git  # GitPython: raises ImportError when there is no git executable
    except ImportError as e:
        return {"available": False, "reason": f"git is not usable ({str(e).splitlines()[0]})"}
    try:
        repository = git.Repo(where, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return {"available": False, "reason": f"{where} is not inside a git repository"}
    except Exception as e:
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    with repository:
        info: dict[str, Any] = {"available": True, "root": repository.working_tree_dir}
        try:
            head = repository.head
            info["commit"] = head.commit.hexsha if head.is_valid() else None
            info["detached"] = head.is_detached
            info["branch"] = None if head.is_detached else repository.active_branch.name
            info["remote"] = _remote(repository)
            untracked = repository.untracked_files
            # staged and unstaged changes to tracked files, against the commit, as bytes:
            # a file that is not UTF-8 must come back unchanged
            raw: bytes = repository.git.diff("HEAD" if info["commit"] else "--cached",
                                             "--binary", stdout_as_string=False)
        except Exception as e:  # a damaged repository, "dubious ownership", ...
            info.update(available=False, reason=f"{type(e).__name__}: {e}")
            return info
    if raw and not raw.endswith(b"\n"):
        raw += b"\n"
    info["dirty"] = bool(raw or untracked)
    info["num_untracked"] = len(untracked)
    info["untracked"] = untracked[:MAX_UNTRACKED]
    info["diff_bytes"] = len(raw)
    info["diff_sha256"] = hashlib.sha256(raw).hexdigest() if raw else None  # before redaction
    if len(raw) > MAX_DIFF_BYTES:
        info["diff_truncated"] = True  # the patch then does not apply; diff_sha256 is whole
        raw = raw[:MAX_DIFF_BYTES]
    info["diff"] = raw.decode("utf-8", "surrogateescape")
    return info


def _script_dir() -> str:
    """Where the training script lies (``python /src/proj/train.py`` run from /scratch),
    else the current directory."""
    script = sys.argv[0] if sys.argv else ""
    return os.path.dirname(os.path.abspath(script)) if os.path.isfile(script) else os.getcwd()


def _remote(repository: Any) -> str | None:
    """The origin's (or the first remote's) URL, with any user name and password removed."""
    remotes = list(repository.remotes)
    if not remotes:
        return None
    remote = next((r for r in remotes if r.name == "origin"), remotes[0])
    url = str(next(iter(remote.urls), ""))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and "@" in parts.netloc:  # scheme://user:password@host/...
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def versions() -> dict[str, Any]:
    nccl = None
    with contextlib.suppress(Exception):  # not built with NCCL (CPU builds)
        version = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    cudnn = None
    with contextlib.suppress(Exception):
        available = torch.backends.cudnn.is_available()  # type: ignore[no-untyped-call]
        cudnn = torch.backends.cudnn.version() if available else None  # type: ignore[no-untyped-call]
    return {
        "hardtrain": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": cudnn,
        "nccl": nccl,
        "numpy": _distribution_version("numpy"),
    }


def packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name and name not in found:  # the first on sys.path is the one imported
            found[name] = distribution.version
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu() -> dict[str, Any]:
    model = platform.processor() or None
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"model": model, "arch": platform.machine(),
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True)}


def gpus(nvml: Any) -> dict[str, Any]:
    """GPU names, UUIDs, driver, VBIOS and ECC mode from NVML; unavailable says why."""
    try:
        with _nvml.session(nvml) as lib:
            devices = [_gpu(lib, index) for index in range(lib.nvmlDeviceGetCount())]
            return {"available": True, "driver": _text(lib.nvmlSystemGetDriverVersion()),
                    "devices": devices}
    except _nvml.NvmlUnavailable as e:
        return {"available": False, "reason": str(e)}
    except Exception as e:
        return {"available": False, "reason": f"NVML: {type(e).__name__}: {e}"}


def _gpu(lib: Any, index: int) -> dict[str, Any]:
    handle = lib.nvmlDeviceGetHandleByIndex(index)
    return {
        "index": index,
        "name": _text(lib.nvmlDeviceGetName(handle)),
        "uuid": _text(lib.nvmlDeviceGetUUID(handle)),
        "vbios": _nvml_or_reason(lambda: _text(lib.nvmlDeviceGetVbiosVersion(handle))),
        "ecc_mode": _nvml_or_reason(
            lambda: "enabled" if lib.nvmlDeviceGetEccMode(handle)[0] else "disabled"),
        "memory_bytes": _nvml_or_reason(lambda: int(lib.nvmlDeviceGetMemoryInfo(handle).total)),
    }


def _nvml_or_reason(read: Any) -> Any:
    try:
        return read()
    except Exception as e:  # NotSupported on consumer GPUs (ECC), ...
        return f"unavailable: {type(e).__name__}"


def device() -> str | None:
    """This process's current CUDA device, if CUDA is in use (never initialises it)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):  # type: ignore[no-untyped-call]
        return None
    index = torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


_text = _nvml.text
