"""Seeding and deterministic kernels. See docs/determinism.md for what is guaranteed."""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch

_CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed Python's ``random``, numpy's global generator, torch's CPU generator and every
    CUDA device's generator with ``seed`` (0 <= seed < 2**32). Returns ``seed``.

    deterministic: also ``use_deterministic_algorithms``; see ``set_deterministic``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r}: must be an int in [0, 2**32)")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too
    if deterministic:
        set_deterministic()
    return seed


def set_deterministic() -> None:
    """Ask torch for deterministic kernels: ``torch.use_deterministic_algorithms(True)``
    (an op without a deterministic implementation then raises instead of silently varying),
    cuDNN deterministic and not benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    (required by cuBLAS for deterministic results on CUDA >= 10.2) unless already set.

    The environment variable only takes effect if CUDA has not been initialised yet: call
    this (or ``seed_everything(..., deterministic=True)``) before the first CUDA operation.
    """
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = _CUBLAS_WORKSPACE
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            warnings.warn(
                "CUDA is already initialised, so CUBLAS_WORKSPACE_CONFIG set now may not take "
                "effect and cuBLAS may not be deterministic: export "
                f"CUBLAS_WORKSPACE_CONFIG={_CUBLAS_WORKSPACE} before starting the job, or call "
                "seed_everything(..., deterministic=True) before the first CUDA operation.",
                stacklevel=2,
            )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def determinism_flags() -> dict[str, object]:
    """The settings that decide whether kernels are deterministic, as they are now."""
    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
