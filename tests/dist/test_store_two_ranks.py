"""The checkpoint store with two real ranks under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("store_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("run")
    results = tmp_path_factory.mktemp("results")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), str(root), str(results)],
        check=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]


pytestmark = pytest.mark.timeout(300)


def test_every_rank_commits_its_own_files_into_one_checkpoint(ranks: list[dict]) -> None:
    assert ranks[0]["load"] == [2, [10.0] * 4, {"rank": 0}]
    assert ranks[1]["load"] == [2, [11.0] * 4, {"rank": 1}]


def test_one_rank_failing_its_write_means_no_commit_and_every_rank_errs(
    ranks: list[dict],
) -> None:
    for rank in ranks:
        assert rank["write_fails"].startswith("CheckpointWriteError")
        assert "rank(s) 1 (IsADirectoryError" in rank["write_fails"]
        assert "nothing was committed" in rank["write_fails"]
        assert 3 not in rank["committed"]


def test_one_rank_with_bad_input_means_no_commit_and_every_rank_errs(ranks: list[dict]) -> None:
    for key in ("input_fails", "input_fails_async"):
        for rank in ranks:  # raised by save / save_async itself, on both ranks
            assert rank[key].startswith("CheckpointWriteError"), (key, rank[key])
            assert "rank 1: TypeError" in rank[key] and "sparse" in rank[key]
    assert 4 not in ranks[0]["committed"] and 5 not in ranks[0]["committed"]
    assert ranks[0]["after_failures"] == ranks[1]["after_failures"] == 6


def test_damage_on_one_rank_makes_every_rank_fall_back_together(ranks: list[dict]) -> None:
    assert ranks[0]["fallback"] == [2, [10.0] * 4, {"rank": 0}]
    assert ranks[1]["fallback"] == [2, [11.0] * 4, {"rank": 1}]
    assert any("rank-00001.safetensors: wrong checksum" in w for w in ranks[1]["fallback_warnings"])
    assert any("step-00000006" in w for w in ranks[0]["fallback_warnings"])


def test_ranks_asking_for_different_steps_both_err_and_nothing_is_written(
    ranks: list[dict],
) -> None:
    for rank in ranks:
        assert "the ranks asked for different steps (rank 0 step 7, rank 1 step 6)" in (
            rank["different_steps"]
        )
    assert 7 not in ranks[0]["committed"]


def test_storage_trouble_on_one_rank_while_loading_is_every_ranks_error(
    ranks: list[dict],
) -> None:
    for rank in ranks:
        assert rank["load_error"].startswith("CheckpointError"), rank["load_error"]
        assert "rank 1: OSError: [Errno 116] Stale file handle" in rank["load_error"]
