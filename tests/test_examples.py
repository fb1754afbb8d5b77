"""The examples, run as a user runs them: real processes, SIGKILLed and started again with
the same command, the DDP one under torchrun with two ranks (gloo). A resumed run must
equal the uninterrupted one bit for bit (the demo, examples/kill_and_resume.py, checks
train_gpt.py the same way at full size)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import hardtrain as ht
from tests.trainer.compare import assert_same_run, losses

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
TIMEOUT_S = 120

# Runs an example unchanged, with a fault keyed by step: SIGKILL on entering step
# KILL_AT + 1, on rank KILL_RANK.  python killer.py SCRIPT KILL_AT KILL_RANK ARGS...
KILLER = """
import os, runpy, signal, sys
import hardtrain as ht

script, kill_at, kill_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fit = ht.HardenedTrainer.fit

def fit_killed_at_step(self, step_fn, *args, **kwargs):
    def step_or_die(batch):
        if self.step == kill_at and int(os.environ.get("RANK", "0")) == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(batch)
    return fit(self, step_or_die, *args, **kwargs)

ht.HardenedTrainer.fit = fit_killed_at_step
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""

# Small enough to run in seconds; checkpoints by step only, so that where a kill lands
# does not depend on the machine's speed.
MLP = ("train_mlp.py", "--steps", "40", "--save-every-steps", "4", "--save-every", "1h")
GPT = ("train_gpt.py", "--steps", "12", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
       "--block-size", "16", "--batch-size", "8", "--warmup-steps", "3", "--sample-chars", "20")
DDP = ("ddp_torchrun.py", "--steps", "12", "--save-every-steps", "4", "--save-every", "1h")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def killer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("killer") / "killer.py"
    path.write_text(KILLER)
    return path


def launch(command: list[str], run_dir: Path, example: tuple[str, ...],
           kill: tuple[int, int] | None = None, killer: Path | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run ``example`` (script name, then its arguments) into ``run_dir`` with ``command``
    (python, or torchrun); with ``kill=(step, rank)``, through the ``killer``."""
    script, *args = example
    target = [str(EXAMPLES / script)]
    if kill is not None:
        assert killer is not None
        target = [str(killer), target[0], str(kill[0]), str(kill[1])]
    return subprocess.run([*command, *target, *args, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=ENV)


def test_train_mlp_killed_and_restarted_equals_an_uninterrupted_run(
    tmp_path: Path, killer: Path
) -> None:
    python = [sys.executable]
    straight = launch(python, tmp_path / "straight", MLP)
    assert straight.returncode == 0, straight.stderr
    assert "train_mlp: step 40/40, resumed_from=None" in straight.stdout

    died = launch(python, tmp_path / "killed", MLP, (9, 0), killer)
    assert died.returncode == -signal.SIGKILL, died.stderr
    # it died in step 10; lines after the last checkpoint may not have been flushed yet
    assert 4 <= max(losses(tmp_path / "killed")) <= 9
    resumed = launch(python, tmp_path / "killed", MLP)
    assert resumed.returncode == 0, resumed.stderr
    # The save at step 8 waited for the one at 4 to commit; it may not have committed itself.
    assert re.search(r"step 40/40, resumed_from=(4|8), ", resumed.stdout), resumed.stdout

    assert_same_run(tmp_path / "straight", tmp_path / "killed")


def test_train_gpt_trains_a_tiny_config_and_prints_a_summary_and_a_sample(
    tmp_path: Path,
) -> None:
    done = launch([sys.executable], tmp_path, GPT)
    assert done.returncode == 0, done.stderr
    summary, sample = done.stdout.split("\n", 1)
    assert re.fullmatch(r"train_gpt: step 12/12, resumed_from=None, 12 steps in [\d.]+s, "
                        r"final loss \d+\.\d{4}", summary), summary
    assert len(sample.removesuffix("\n")) == 20
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 13))
    assert all(math.isfinite(loss) for loss in curve.values())
    assert ht.CheckpointStore(tmp_path).load().step == 12


def test_ddp_torchrun_with_a_rank_killed_resumes_both_ranks(tmp_path: Path, killer: Path) -> None:
    died = launch(TORCHRUN, tmp_path, DDP, (9, 1), killer)  # rank 1; torchrun stops rank 0
    assert died.returncode != 0
    assert "SIGKILL" in died.stderr, died.stderr
    resumed = launch(TORCHRUN, tmp_path, DDP)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"ddp_torchrun: 2 ranks, step 12/12, resumed_from=(4|8), ",
                     resumed.stdout), resumed.stdout

    # The steps after the checkpoint ran twice, before the kill and after the restart
    # (rank 0 logs them): the same losses, bit for bit.
    written: dict[int, list[float]] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        written.setdefault(entry["step"], []).append(entry["loss"])
    assert sorted(written) == list(range(1, 13))
    replayed = {step: found for step, found in written.items() if len(found) > 1}
    assert 9 in replayed, written
    assert all(len(set(found)) == 1 for found in replayed.values()), replayed
    for rank in (0, 1):
        assert ht.CheckpointStore(tmp_path).load(rank=rank).step == 12
