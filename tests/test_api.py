"""The public surface is a contract: pinned here, and importing it does nothing."""

from __future__ import annotations

import subprocess
import sys

import hardtrain as ht

PUBLIC = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointPolicy",
    "CheckpointStorageError",
    "CheckpointStore",
    "CheckpointWriteError",
    "EnvironmentChangedError",
    "EnvironmentChangedWarning",
    "EventLog",
    "FileProblem",
    "FitResult",
    "HardenedTrainer",
    "HardtrainError",
    "HealthReport",
    "LoadedCheckpoint",
    "MetadataChange",
    "MetadataPolicy",
    "NanPolicy",
    "NoCheckpointError",
    "NonFiniteLossError",
    "Preempted",
    "PreemptionGuard",
    "PreemptionPolicy",
    "RunDirInUseError",
    "UnhealthyDeviceError",
    "VerifyReport",
    "__version__",
    "capture_metadata",
    "seed_everything",
    "set_deterministic",
]


def test_public_names_are_pinned() -> None:
    assert sorted(ht.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(ht, name), name


def test_errors_form_one_tree_and_match_builtins() -> None:
    for name in PUBLIC:
        obj = getattr(ht, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, ht.HardtrainError), name
    assert issubclass(ht.CheckpointWriteError, OSError)
    assert issubclass(ht.NoCheckpointError, FileNotFoundError)
    assert issubclass(ht.CheckpointMismatchError, ValueError)
    assert "runbooks/checkpoint-corruption.md" in str(ht.CheckpointCorruptError("x"))


def test_import_has_no_side_effects() -> None:
    code = (
        "import logging, signal, threading\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "import hardtrain\n"
        "assert signal.getsignal(signal.SIGTERM) is before\n"
        "assert logging.getLogger().handlers == []\n"
        "assert logging.getLogger('hardtrain').handlers == []\n"
        "assert threading.active_count() == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constructing_a_store_opens_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ht.CheckpointStore(tmp_path / "run", keep_last=2)
    assert not (tmp_path / "run").exists()
