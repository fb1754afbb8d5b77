"""Kill a real training process, start it again, and get the uninterrupted run bit for bit.

Each case runs tests/trainer/train_script.py three times: uninterrupted (shared between
cases with the same training settings), then with a SIGKILL keyed by step, then again with
the same command. Dropout, AdamW, StepLR, numpy and Python randomness in the step, and a
shuffled DataLoader with two workers crossing epoch boundaries (8 batches per epoch, 30
steps) are in every case.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.trainer.compare import assert_same_run, losses, run, straight

CASES = {
    "loader-async-mid-epoch": (("--every-steps", "3"), ("--kill-at", "11")),
    "loader-sync-accum": (("--every-steps", "3", "--sync", "--accum", "2"), ("--kill-at", "11")),
    "loader-kill-during-save": (("--every-steps", "3"), ("--kill-in-save", "10")),
    "loader-no-workers": (("--every-steps", "5", "--workers", "0"), ("--kill-at", "17")),
    "persistent-workers": (("--every-steps", "3", "--data", "persistent"), ("--kill-at", "19")),
    "batch-sampler": (("--every-steps", "3", "--data", "batch-sampler"), ("--kill-at", "12")),
    "stateful-dataloader": (("--every-steps", "3", "--data", "stateful"), ("--kill-at", "20")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_and_restart_equals_uninterrupted_run(
    case: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings, fault = CASES[case]
    if "stateful" in settings:
        pytest.importorskip("torchdata")
    baseline = straight(tmp_path_factory, tuple(a for a in settings if a != "--sync"))
    killed = run(tmp_path, *settings, *fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    written = losses(tmp_path)
    assert 0 < len(written) < 30  # it died mid-run
    resumed = run(tmp_path, *settings)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_from=None" not in resumed.stdout
    assert_same_run(baseline, tmp_path)


def test_plain_iterable_warns_that_its_position_is_lost(tmp_path: Path) -> None:
    settings = ("--every-steps", "3", "--data", "iterable", "--sync")
    assert run(tmp_path, *settings, "--kill-at", "11").returncode == -signal.SIGKILL
    resumed = run(tmp_path, *settings)
    assert resumed.returncode == 0, resumed.stderr
    assert "cannot be restored" in resumed.stderr
    assert "done step=30 resumed_from=9" in resumed.stdout
