"""HardenedTrainer under torchrun: two and three ranks, DDP, a DistributedSampler, gloo.

A run killed on one rank and started again equals the uninterrupted run on every rank:
each rank's per-step losses and each rank's final checkpoint, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hardtrain as ht
from tests.trainer.compare import assert_same_run

WORKER = Path(__file__).with_name("trainer_worker.py")
pytestmark = pytest.mark.timeout(300)


def torchrun(
    run_dir: Path, results: Path, *args: str, ranks: int = 2, restarts: int = 0
) -> subprocess.CompletedProcess[str]:
    # Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torchrun's restarted workers share the
    # agent's store with the attempt before and may connect to its dead workers
    # ("Gloo connectFullMesh failed ... Connection refused"; runbooks/preemption.md).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's Python stack
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
         f"--max-restarts={restarts}", str(WORKER), str(run_dir), str(results), *args],
        capture_output=True, text=True, timeout=240, env=env,
    )


def rank_losses(results: Path, rank: int) -> dict[int, float]:
    found = {}
    for line in (results / f"rank{rank}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        found[entry["step"]] = entry["loss"]
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    paths = {name: root / name for name in ("straight", "killed", "straight-out", "killed-out")}
    for path in paths.values():
        path.mkdir()
    done = torchrun(paths["straight"], paths["straight-out"])
    assert done.returncode == 0, done.stderr[-3000:]
    killed = torchrun(paths["killed"], paths["killed-out"], "--kill-rank", "1", "--kill-at", "8")
    assert killed.returncode != 0
    resumed = torchrun(paths["killed"], paths["killed-out"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    paths["resumed_stdout"] = Path(resumed.stdout)  # type: ignore[assignment]
    return paths


def test_both_ranks_resume_from_the_same_step(runs: dict[str, Path]) -> None:
    out = str(runs["resumed_stdout"])
    found = sorted(re.findall(r"rank=(\d) step=14 resumed_from=(\d+)", out))
    assert [rank for rank, _ in found] == ["0", "1"], out
    assert found[0][1] == found[1][1] in ("3", "6"), out  # 6 unless its async save was cut


def test_every_rank_equals_the_uninterrupted_run(runs: dict[str, Path]) -> None:
    for rank in range(2):
        straight = rank_losses(runs["straight-out"], rank)
        resumed = rank_losses(runs["killed-out"], rank)
        assert sorted(straight) == list(range(1, 15))
        assert resumed == straight, rank  # the last line per step, replayed steps included
    assert rank_losses(runs["straight-out"], 0) != rank_losses(runs["straight-out"], 1)
    assert_same_run(runs["straight"], runs["killed"], ranks=2)  # rank 0's metrics; all state


def test_run_json_names_every_rank_and_a_restart_changes_nothing(
    runs: dict[str, Path]
) -> None:
    store = ht.CheckpointStore(runs["killed"])
    meta = json.loads(store.read_file(14, "run.json"))  # rank 0 wrote it, for every rank
    assert meta["world"]["world_size"] == 2
    assert [r["rank"] for r in meta["world"]["ranks"]] == [0, 1]
    assert [r["local_rank"] for r in meta["world"]["ranks"]] == [0, 1]
    assert all(r["host"] == meta["host"]["hostname"] for r in meta["world"]["ranks"])
    # torchrun's new port and run id at the restart are not changes that break exactness
    events = [json.loads(line) for line in (runs["killed"] / "events.jsonl").open()]
    assert [e for e in events if e["event"] == "environment_changed"] == []
    assert sorted(e["rank"] for e in events if e["event"] == "resumed") == [0, 1]


def test_resuming_with_another_world_size_is_an_error(runs: dict[str, Path]) -> None:
    before = sorted(p.name for p in (runs["killed"] / "checkpoints").iterdir())
    alone = subprocess.run(
        [sys.executable, str(WORKER), str(runs["killed"]), str(runs["killed-out"])],
        capture_output=True, text=True, timeout=120,
    )
    assert alone.returncode != 0
    assert "CheckpointMismatchError" in alone.stderr
    assert "written by 2 rank(s), this job has 1" in alone.stderr
    assert "runbooks/resume-mismatch.md" in alone.stderr
    assert sorted(p.name for p in (runs["killed"] / "checkpoints").iterdir()) == before
    assert ht.CheckpointStore(runs["killed"]).latest().step == 14  # type: ignore[union-attr]


def test_three_ranks_with_several_buckets_restart_exactly(tmp_path: Path) -> None:
    """DDP rebuilds its buckets once per process; with 3 ranks the all-reduce's sums depend
    on the layout, so a restarted process must get the same one (_settle_ddp_buckets)."""
    for name in ("a", "b", "a-out", "b-out"):
        (tmp_path / name).mkdir()
    args = ("--deep", "--steps")
    done = torchrun(tmp_path / "a", tmp_path / "a-out", *args, "12", ranks=3)
    assert done.returncode == 0, done.stderr[-3000:]
    for steps in ("6", "12"):  # stopped at 6, started again
        done = torchrun(tmp_path / "b", tmp_path / "b-out", *args, steps, ranks=3)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "a", tmp_path / "b", ranks=3)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    stopped = torchrun(run_dir, out, "--term-rank", "1", "--term-at", "7")  # inside step 8
    assert stopped.returncode != 0
    exits = re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)",
                       stopped.stderr)
    # Each rank exits 143 or, if torchrun's clean-up SIGTERM (sent once the other rank
    # exited) lands after its fit restored the default handler, -15: either way after the
    # save. The first to exit exits 143.
    codes = dict(exits)
    assert set(codes.values()) <= {"143", "-15"} and "143" in codes.values(), \
        stopped.stderr[-3000:]
    assert [max(rank_losses(out, rank)) for rank in range(2)] == [8, 8]
    assert [info.step for info in ht.CheckpointStore(run_dir).list()][-1] == 8
    preempted = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
                 if e["event"] in ("preempted", "preemption_requested")]
    assert sorted((e["event"], e["rank"], e["step"]) for e in preempted) == [
        ("preempted", 0, 8), ("preempted", 1, 8),
        ("preemption_requested", 0, 8), ("preemption_requested", 1, 8)]
    assert all(e["signalled_ranks"] == [1] for e in preempted if "signalled_ranks" in e)
    assert all(e["saved"] and e["exit_code"] == 143 for e in preempted if "saved" in e)
    resumed = torchrun(run_dir, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.findall(r"resumed_from=(\d+)", resumed.stdout) == ["8", "8"]
    assert_same_run(runs["straight"], run_dir, ranks=2)


def test_torchrun_restarts_a_killed_worker_and_the_job_ends_exactly(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    done = torchrun(run_dir, out, "--kill-rank", "1", "--kill-at", "8", "--first-attempt-only",
                    restarts=3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.findall(r"resumed_from=(\d+)", done.stdout) in (["6", "6"], ["3", "3"]), done.stdout
    assert_same_run(runs["straight"], run_dir, ranks=2)


def test_nan_on_one_rank_is_skipped_on_both_without_a_hang(tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    done = torchrun(run_dir, out, "--nan-rank", "1", "--nan-at", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
               if e["event"] == "step_skipped"]
    # rank 1's NaN loss reaches rank 0's gradients through DDP's all-reduce
    assert sorted((e["rank"], e["step"], e["reason"], e["first_rank"]) for e in skipped) == [
        (0, 5, "loss", 1), (1, 5, "loss", 1)]
    states = [ht.CheckpointStore(run_dir).load(rank=r) for r in range(2)]
    assert states[0].step == states[1].step == 14
    for name, tensor in states[0].tensors.items():
        if name.startswith("model/"):  # DDP kept the replicas equal through the skip
            assert torch.equal(tensor, states[1].tensors[name]), name


def test_a_new_feature_stops_both_ranks_when_one_sees_its_file(tmp_path: Path) -> None:
    """The example feature of docs/architecture.md: only rank 1's file appears, the ballot
    carries its vote, both ranks stop after the same step with that step saved."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    stop_file = str(tmp_path / "STOP.{rank}")
    done = torchrun(run_dir, out, "--stop-file", stop_file, "--stop-rank", "1",
                    "--stop-at", "6")
    assert done.returncode == 0, done.stderr[-3000:]  # StopFileSeen(0): saved, clean exit
    assert not (tmp_path / "STOP.0").exists() and (tmp_path / "STOP.1").exists()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    seen = sorted((e["rank"], e["step"], e["seen_here"]) for e in events
                  if e["event"] == "stop_file_seen")
    assert seen == [(0, 7, False), (1, 7, True)]
    assert not [e for e in events if e["event"] == "training_finished"]
    assert ht.CheckpointStore(run_dir).latest().step == 7  # type: ignore[union-attr]
    for rank in range(2):
        assert max(rank_losses(out, rank)) == 7


def test_saves_failing_on_one_rank_leave_both_training(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Rank 1's storage fails the checkpoints of steps 6 and 9: no commit on any rank,
    both ranks go on (each learns of it in its own time, and they agree at the end), and
    the run ends at step 14 equal to the run never troubled."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir(), out.mkdir()
    done = torchrun(run_dir, out, "--fail-rank", "1", "--fail-steps", "6,9")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank=0 step=14" in done.stdout and "rank=1 step=14" in done.stdout
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    failed = sorted({e["step"] for e in events if e["event"] == "checkpoint_save_failed"})
    assert failed == [6, 9]
    assert all("rank(s) 1" in e["error"] for e in events if e["event"] == "checkpoint_save_failed")
    assert [i.step for i in ht.CheckpointStore(run_dir).list()] == [12, 14]
    for rank in (0, 1):
        assert rank_losses(out, rank) == rank_losses(runs["straight-out"], rank)
    assert_same_run(runs["straight"], run_dir)
