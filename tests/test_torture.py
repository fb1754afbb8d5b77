"""``hardtrain torture``: the installed console script on real training processes, SIGTERMed
and SIGKILLed at random steps; and its comparison, in-process, on run directories
made by hand."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import hardtrain as ht
import hardtrain.cli
from hardtrain.torture import (
    Comparison,
    Divergence,
    FreshStarts,
    Interruption,
    PlannedInterruption,
    ReferenceRun,
    TortureReport,
    compare_runs,
    plan_interruptions,
)
from hardtrain.torture._jobs import launched
from hardtrain.torture._logs import record_start
from hardtrain.torture._run import _interrupt, target_step
from hardtrain.torture._watch import FirstCheckpoint

HARDTRAIN = shutil.which("hardtrain", path=os.path.dirname(sys.executable))
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "torture_scripts" / "tiny.py"
MLP = ROOT / "examples" / "train_mlp.py"
DDP = ROOT / "examples" / "ddp_torchrun.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
# hardtrain torture's own result lines
INTERRUPTION = re.compile(r"^interruption (\d+)/(\d+): (SIGTERM|SIGKILL) .* -> (?:still running "
                          r"after --grace, SIGKILLed )?(during training|in start-up|after "
                          r"training|ignored|missed)", re.M)
AIMED = re.compile(r"^interruption (\d+)/\d+: (SIGTERM|SIGKILL) at step (\d+) \(aimed at step "
                   r"(\d+), (?:fresh start|from step (\d+))\) -> during training; newest "
                   r"checkpoint then: [^;]+; (.*)$", re.M)

pytestmark = pytest.mark.timeout(300)


def torture(*args: str, cwd: Path, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    assert HARDTRAIN is not None, f"no hardtrain console script next to {sys.executable}"
    result = subprocess.run([HARDTRAIN, "torture", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env=ENV, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def seed_where(num_kills: int, ok: Callable[[list[PlannedInterruption]], bool]) -> int:
    """The smallest seed whose plan ``ok`` accepts: tests pin what the plan is, not the
    machine's timing."""
    return next(s for s in range(10_000) if ok(plan_interruptions(num_kills, "mix", s)))


def all_mid_training(plan: list[PlannedInterruption]) -> bool:
    return all(p.phase == "training" and 0.2 <= p.fraction <= 0.8 for p in plan)


def landings(stdout: str) -> list[tuple[str, str]]:
    """(signal, where it landed) per interruption line."""
    return [(m.group(3), m.group(4)) for m in INTERRUPTION.finditer(stdout)]


def verdict(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("VERDICT: ")]
    assert len(lines) == 1, stdout
    return lines[0]


# Every process these tests start inherits this mark, so that a test suite running beside
# this one (another checkout, CI) is not mistaken for processes that outlived torture.
SESSION = f"HARDTRAIN_TESTS_SESSION={uuid.uuid4().hex}"
os.environ["HARDTRAIN_TESTS_SESSION"] = SESSION.split("=", 1)[1]


def job_processes() -> list[int]:
    """Processes started by a torture of this test session (they carry its token in their
    environment)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
            if b"HARDTRAIN_TORTURE_JOB=" in environ and SESSION.encode() in environ:
                found.append(int(name))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture(autouse=True)
def nothing_outlives_a_start() -> Iterator[None]:
    yield
    if os.path.isdir("/proc"):
        assert job_processes() == [], "processes of a tortured command outlived hardtrain torture"


def same_runs(a: Path, b: Path) -> None:
    """An independent check of an EXACT verdict: the last loss logged per step, and every
    tensor of the final checkpoint with torch.equal."""
    def losses(run: Path) -> dict[int, float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {e["step"]: e["loss"] for e in map(json.loads, lines)}

    assert losses(a) == losses(b)
    ca, cb = ht.CheckpointStore(a).load(), ht.CheckpointStore(b).load()
    assert ca.step == cb.step and sorted(ca.tensors) == sorted(cb.tensors)
    assert all(torch.equal(ca.tensors[n], cb.tensors[n]) for n in ca.tensors)
    assert ca.state == cb.state


# ------------------------------------------------------------------------ real processes


def test_the_mlp_example_survives_exactly_and_the_work_dir_goes(tmp_path: Path) -> None:
    seed = seed_where(3, lambda p: all_mid_training(p)
                      and {i.signal.name for i in p} == {"SIGTERM", "SIGKILL"})
    work = tmp_path / "work"
    done = torture("--kills", "3", "--signal", "mix", "--seed", str(seed), "--grace", "20",
                   "--work-dir", str(work), "--",
                   sys.executable, str(MLP), "--run-dir", "{run_dir}", "--steps", "300",
                   "--save-every-steps", "20", "--save-every", "1h", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"--seed {seed}" in done.stdout
    assert verdict(done.stdout).startswith("VERDICT: EXACT: every loss and lr of 300 steps")
    landed = landings(done.stdout)
    assert len(landed) == 3 and ("during training" in {w for _, w in landed})
    assert "start 4 (resumed from step " in done.stdout
    assert not work.exists()  # made by the command, removed after EXACT


@pytest.mark.timeout(450)
def test_thirty_random_sigterms_and_sigkills_end_bit_exact(tmp_path: Path) -> None:
    """The soak in the default suite: 30 interruptions, SIGTERM or SIGKILL at random, each
    followed by a restart, then every loss and final tensor compared bit for bit. A
    checkpoint every 2 steps: the metrics lines that the interruptions wait for reach the
    file at each one, and 24 training interruptions must fit in 144 steps (a loaded
    machine runs a few steps past each target before the signal lands)."""
    work = tmp_path / "work"
    done = torture("--kills", "30", "--signal", "mix", "--seed", "5", "--grace", "20",
                   "--work-dir", str(work), "--keep", "--",
                   sys.executable, str(TINY), "--run-dir", "{run_dir}", "--steps", "160",
                   "--step-s", "0.03", "--every-steps", "2", cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdict(done.stdout).startswith("VERDICT: EXACT")
    landed = landings(done.stdout)
    assert [int(m.group(1)) for m in INTERRUPTION.finditer(done.stdout)] == list(range(1, 31))
    signals = [s for s, _ in landed]
    assert signals.count("SIGTERM") >= 5 and signals.count("SIGKILL") >= 5, landed
    assert sum(w == "during training" for _, w in landed) >= 15, landed
    assert "start 31 (" in done.stdout
    logs = sorted(p.name for p in work.glob("*.log"))
    assert logs == ["reference.log"] + [f"tortured-{i:02d}.log" for i in range(1, 32)]
    same_runs(work / "reference", work / "tortured")


@pytest.mark.timeout(200)
def test_a_private_random_generator_diverges_at_the_first_step_after_a_resume(
    tmp_path: Path,
) -> None:
    """tiny.py --private-rng draws from a module-level random.Random(0) that no
    checkpoint holds: a resumed process draws from its start again."""
    seed = seed_where(3, all_mid_training)
    work = tmp_path / "work"
    done = torture("--kills", "3", "--seed", str(seed), "--grace", "20",
                   "--work-dir", str(work), "--",
                   sys.executable, str(TINY), "--run-dir", "{run_dir}", "--steps", "60",
                   "--step-s", "0.02", "--every-steps", "1", "--sync", "--private-rng",
                   cwd=tmp_path, timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    line = verdict(done.stdout)
    match = re.match(r"VERDICT: DIVERGED at step (\d+): loss \S+ \(reference\) != \S+ "
                     r"\(tortured\), logged by start (\d+), which resumed from step (\d+) "
                     r"\(its first step after the resume\)$", line)
    assert match, line
    step, start, resumed_from = map(int, match.groups())
    events = [json.loads(x) for x in (work / "tortured" / "events.jsonl").read_text().splitlines()]
    resumes = [e["from_step"] for e in events if e["event"] == "resumed"]
    assert resumed_from == min(r for r in resumes if r > 0) and step == resumed_from + 1
    assert 2 <= start <= 4
    assert "docs/torture.md" in done.stdout and "runbooks/preemption.md" in done.stdout
    assert work.exists()  # kept for the post-mortem
    assert f"work dir: {work}" in done.stdout


@pytest.mark.timeout(200)
def test_interruptions_land_at_the_planned_steps(tmp_path: Path) -> None:
    """Each training interruption waits until its start has logged its target step, which
    the seed and the step the start resumed from fix; a SIGTERMed start stops at or after
    the step it had logged."""
    seed = seed_where(4, lambda p: all_mid_training(p)
                      and {i.signal.name for i in p} == {"SIGTERM", "SIGKILL"})
    plan = plan_interruptions(4, "mix", seed)
    done = torture("--kills", "4", "--seed", str(seed), "--grace", "20",
                   "--work-dir", str(tmp_path / "work"), "--",
                   sys.executable, str(TINY), "--run-dir", "{run_dir}", "--steps", "80",
                   "--step-s", "0.02", "--every-steps", "4", "--sync", cwd=tmp_path,
                   timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    aimed = list(AIMED.finditer(done.stdout))
    assert [int(m.group(1)) for m in aimed] == [1, 2, 3, 4], done.stdout
    for index, m in enumerate(aimed):
        signal_name, at, target = m.group(2), int(m.group(3)), int(m.group(4))
        resumed_from = int(m.group(5) or 0)
        assert signal_name == plan[index].signal.name
        assert target == target_step(index, 4, plan[index].fraction, resumed_from, 80), m[0]
        assert resumed_from < target <= at <= 80, m[0]
        if signal_name == "SIGTERM":
            stopped = re.search(r"preempted at step (\d+) \(saved\)", m.group(6))
            assert stopped and int(stopped.group(1)) >= at, m[0]


@pytest.mark.timeout(200)
def test_an_unseeded_job_is_told_to_seed(tmp_path: Path) -> None:
    """tiny.py --seed-torch-only leaves Python's random and numpy's global generator
    unseeded: the losses match, the RNG state in the final checkpoints does not, and the
    first checkpoints of the two runs (both fresh starts) already differ there."""
    seed = seed_where(2, all_mid_training)
    done = torture("--kills", "2", "--seed", str(seed), "--grace", "20",
                   "--work-dir", str(tmp_path / "work"), "--",
                   sys.executable, str(TINY), "--run-dir", "{run_dir}", "--steps", "40",
                   "--step-s", "0.02", "--keep-last", "0", "--seed-torch-only",
                   cwd=tmp_path, timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    assert verdict(done.stdout).startswith("VERDICT: DIVERGED in the final checkpoint (step 40)")
    assert "rng/" in verdict(done.stdout)
    assert ("unseeded: seed it with ht.seed_everything(SEED) at the top of the script, or "
            "HardenedTrainer(seed=SEED): Python's random and numpy's global generator "
            "already differ between two starts that resumed nothing (the first checkpoint "
            "of each run, step 5)") in done.stdout
    assert "private random generator" not in done.stdout
    assert not (tmp_path / "work" / "first-checkpoints").exists()


@pytest.mark.slow  # ~45 s; torchrun + SIGTERM is in the default suite in tests/dist
def test_a_torchrun_command_with_two_ranks(tmp_path: Path) -> None:
    """SIGTERM goes to torchrun, which passes it on to its workers (in sessions of their
    own); SIGKILL hits torchrun and both workers at once. None of them outlives its start
    (the autouse fixture checks)."""
    seed = seed_where(2, lambda p: all_mid_training(p)
                      and [i.signal.name for i in p] == ["SIGTERM", "SIGKILL"])
    done = torture("--kills", "2", "--seed", str(seed), "--grace", "20",
                   "--work-dir", str(tmp_path / "work"), "--",
                   sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", str(DDP), "--run-dir", "{run_dir}", "--steps", "40",
                   "--save-every-steps", "4", "--save-every", "1h", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 rank(s)" in done.stdout
    assert verdict(done.stdout).startswith("VERDICT: EXACT")
    assert [s for s, _ in landings(done.stdout)] == ["SIGTERM", "SIGKILL"]


def test_no_interruption_during_training_is_inconclusive(tmp_path: Path) -> None:
    seed = seed_where(1, lambda p: p[0].phase == "start-up" and p[0].fraction < 0.3)
    work = tmp_path / "work"
    done = torture("--kills", "1", "--signal", "kill", "--seed", str(seed), "--work-dir",
                   str(work), "--", sys.executable, str(TINY), "--run-dir", "{run_dir}",
                   cwd=tmp_path, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert landings(done.stdout) == [("SIGKILL", "in start-up")]
    assert verdict(done.stdout) == ("VERDICT: INCONCLUSIVE: the runs are equal, but no "
                                    "interruption landed during training")
    assert work.exists()


# ----------------------------------------------------------------------------- usage
# In-process (hardtrain.cli.main), except --help: nothing here trains.


def run_main(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = hardtrain.cli.main(["torture", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args", [[], ["--kills", "3"], ["--kills", "3", "--"]])
def test_no_command_is_a_usage_error(args: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main("--work-dir", str(tmp_path / "w"), *args, capsys=capsys)
    assert code == 2
    assert "no command to torture: give it after --" in err
    assert not (tmp_path / "w").exists()


def test_a_command_without_dashes_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        hardtrain.cli.main(["torture", "--kills", "3", "python", "train.py"])
    assert exited.value.code == 2
    assert "unrecognized arguments: python train.py (the command to torture goes after --)" \
        in capsys.readouterr().err


def test_kills_must_be_at_least_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main("--kills", "0", "--work-dir", str(tmp_path / "w"), "--", "true",
                            capsys=capsys)
    assert code == 2
    assert "--kills 0: must be an int >= 1" in err
    assert not (tmp_path / "w").exists()


def test_a_command_that_fails_on_its_own_prints_its_log_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    code, _, err = run_main(
        "--work-dir", str(work), "--", sys.executable, "-c",
        "import sys; print('loading the data'); sys.exit('no such file: data.bin')",
        capsys=capsys)
    assert code == 2
    assert "the reference run (the command, uninterrupted) ended on its own (exit 1)" in err
    assert f"--- last lines of {work / 'reference.log'} ---" in err
    assert "loading the data\nno such file: data.bin" in err
    assert "See docs/torture.md" in err
    assert (work / "reference.log").exists()


def test_a_command_that_ignores_the_run_dir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main("--work-dir", str(tmp_path / "work"), "--", sys.executable,
                              "-c", "pass", capsys=capsys)
    assert code == 2
    assert "note: no {run_dir} in the command" in out
    assert "wrote no training_started and training_finished events" in err


def test_a_missing_executable_and_a_used_work_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main("--work-dir", str(tmp_path / "a"), "--", str(tmp_path / "nope"),
                            capsys=capsys)
    assert code == 2
    assert f"cannot start '{tmp_path / 'nope'}'" in err
    (tmp_path / "b" / "tortured").mkdir(parents=True)
    code, _, err = run_main("--work-dir", str(tmp_path / "b"), "--", "true", capsys=capsys)
    assert code == 2
    assert "already holds tortured/ from an earlier torture" in err


def test_help_names_the_exit_codes(tmp_path: Path) -> None:
    done = torture("--help", cwd=tmp_path, timeout=60)
    assert done.returncode == 0
    for text in ("0 EXACT", "1 DIVERGED", "2 bad usage", "3 INCONCLUSIVE", "{run_dir}",
                 "$HARDTRAIN_RUN_DIR", "--kills N", "--grace SECONDS", "docs/torture.md"):
        assert text in done.stdout, text


# ---------------------------------------------------------------- comparison, in-process


def write_run(run: Path, lines: list[str], tensors: dict[str, torch.Tensor],
              state: dict[str, object]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(lines))
    ht.CheckpointStore(run).save(4, tensors, state)


def line(step: int, loss: float, lr: float = 0.1) -> str:
    return json.dumps({"step": step, "loss": loss, "lr": lr, "step_time_s": 0.01}) + "\n"


def special() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([float("nan"), -0.0, 1.5]), "n": torch.tensor(3)}


def test_compare_is_bit_for_bit_and_reads_replays_and_torn_lines(tmp_path: Path) -> None:
    losses = [0.5, 0.25, float("nan"), -0.0]
    write_run(tmp_path / "a", [line(s + 1, x) for s, x in enumerate(losses)], special(),
              {"epoch": 1, "lr": 0.1})
    killed = [line(1, 0.5), line(2, 0.25), line(3, float("nan"))[:20]]  # cut short by a kill
    replayed = [line(3, float("nan")), line(4, -0.0)]
    write_run(tmp_path / "b", killed + replayed, special(), {"epoch": 1, "lr": 0.1})
    found = compare_runs(tmp_path / "a", tmp_path / "b")
    assert found.first is None, found
    assert (found.num_steps, found.num_lines, found.num_torn) == (4, 4, 1)
    assert (found.checkpoint_step, found.world_size, found.num_tensors) == (4, 1, 2)

    bad = special()
    bad["w"][1] = 0.0  # -0.0 == 0.0, but not bit for bit
    write_run(tmp_path / "c", [line(1, 0.5), line(2, 0.25), line(2, 0.25 + 2**-50),
                               line(3, math.nan), line(4, 0.0)], bad, {"epoch": 1, "lr": 0.1})
    found = compare_runs(tmp_path / "a", tmp_path / "c")
    assert found.metrics is not None and found.metrics.step == 2
    assert str(found.metrics).startswith("at step 2: loss 0.25 (reference) != 0.25000000000000")
    assert found.checkpoint is not None
    assert (found.checkpoint.rank, found.checkpoint.name) == (0, "w")
    assert "1 of 3 elements differ, first at flat index 1: -0.0" in str(found.checkpoint)
    assert found.num_tensors_differing == 1


def test_compare_names_a_missing_step_and_a_state_difference(tmp_path: Path) -> None:
    write_run(tmp_path / "a", [line(1, 0.5), line(2, 0.25)], special(), {"rng": [1, 2.5]})
    write_run(tmp_path / "b", [line(1, 0.5)], special(), {"rng": [1, 2.5000001]})
    found = compare_runs(tmp_path / "a", tmp_path / "b")
    assert found.metrics is not None and (found.metrics.step, found.metrics.what) == (2, "missing")
    assert found.checkpoint is not None and found.checkpoint.name == "state/rng[1]"


def test_the_verdict_and_exit_code() -> None:
    reference = ReferenceRun(10.0, 3.0, 0.05, 100, 1)
    equal = Comparison(100, 120, 0, 100, 1, 18, 0, None, None)
    diverged = Comparison(100, 120, 0, 100, 1, 18, 1, None,
                          Divergence(100, "tensor", "1.0", "2.0", rank=0, name="model/w"))

    def report(landed: list[str], comparison: Comparison) -> TortureReport:
        hits = tuple(Interruption(i + 1, "SIGKILL", "training", 0.1, where, None, None,
                                  "killed by SIGKILL") for i, where in enumerate(landed))
        return TortureReport(1, Path("w"), True, reference, hits, 3, comparison)

    assert (report(["start-up", "training"], equal).verdict, report([], equal).exit_code) == (
        "EXACT", 3)
    assert report(["start-up", "after training"], equal).verdict == "INCONCLUSIVE"
    found = report(["start-up"], diverged)  # a difference counts wherever it came from
    assert (found.verdict, found.exit_code) == ("DIVERGED", 1)
    assert found.summary()[-3] == ("VERDICT: DIVERGED in the final checkpoint (step 100): "
                                   "rank 0 tensor model/w: 1.0 (reference) vs 2.0 (tortured)")


def test_the_unseeded_hint_needs_the_evidence() -> None:
    """The hint names seeding only when the runs differ in process-wide RNG streams alone
    and two fresh starts already differ in each of them; else the usual hint."""
    reference = ReferenceRun(10.0, 3.0, 0.05, 100, 1)
    hit = (Interruption(1, "SIGKILL", "training", 0.0, "training", None, 40, "killed by SIGKILL",
                        target_step=42, step=45),)

    def hint(only_rng: tuple[str, ...], fresh: FreshStarts | None, metrics: bool = False,
             ) -> str:
        found = Divergence(100, "state", "1", "2", rank=0, name="state/hardtrain/rng/numpy")
        loss = Divergence(7, "loss", "0.5", "0.25") if metrics else None
        comparison = Comparison(100, 120, 0, 100, 1, 18, 0, loss, found, only_rng)
        lines = TortureReport(1, Path("w"), False, reference, hit, 1, comparison,
                              fresh).summary()
        return lines[-1]

    assert hint(("python", "numpy"), FreshStarts(5, ("python", "numpy"))).startswith(
        "unseeded: seed it with ht.seed_everything(SEED) at the top of the script, or "
        "HardenedTrainer(seed=SEED): Python's random and numpy's global generator already "
        "differ between two starts that resumed nothing (the first checkpoint of each run, "
        "step 5)")
    usual = "state the checkpoint does not hold (a private random generator"
    assert hint(("numpy",), None).startswith(usual)  # no evidence
    assert hint(("numpy",), FreshStarts(5, ())).startswith(usual)  # fresh starts agree
    assert hint(("torch", "numpy"), FreshStarts(5, ("numpy",))).startswith(usual)
    assert hint((), FreshStarts(5, ("numpy",))).startswith(usual)  # differs elsewhere too
    assert hint(("numpy",), FreshStarts(5, ("numpy",)), metrics=True).startswith(usual)


def test_a_missed_interruption_names_the_newest_checkpoint(tmp_path: Path) -> None:
    """A start that resumed the final checkpoint exits 0 before its target step: the
    interruption missed, and its line names the checkpoints committed by then."""
    run_dir = tmp_path / "tortured"
    run_dir.mkdir()
    events = run_dir / "events.jsonl"
    events.write_text("".join(json.dumps({"time": 1.0 + i, "event": "checkpoint_saved",
                                          "rank": 0, "step": step}) + "\n"
                              for i, step in enumerate((55, 60))))
    start = record_start(run_dir, 2)
    resumed = json.dumps({"time": 3.0, "event": "resumed", "rank": 0, "from_step": 60}) + "\n"
    resumes = f"open({str(events)!r}, 'a').write({resumed!r})"  # and exits 0
    planned = PlannedInterruption(signal.SIGKILL, "training", 0.5, 0.5)
    with launched([sys.executable, "-c", resumes], dict(ENV), run_dir,
                  tmp_path / "tortured-02.log") as job:
        hit = _interrupt(job, start, planned, ReferenceRun(5.0, 1.0, 0.05, 60, 1), 1, 2, 5.0,
                         60.0, FirstCheckpoint(tmp_path, "tortured"))
    assert (hit.landed, hit.checkpoint_step, hit.target_step, hit.resumed_from) == (
        "missed", 60, 61, 60)
    assert hit.describe(2) == ("interruption 2/2: SIGKILL aimed at step 61 (from step 60) -> "
                               "missed (the start had finished); newest checkpoint then: "
                               "step 60; exit 0")


def test_the_plan_is_a_function_of_the_seed() -> None:
    assert plan_interruptions(30, "mix", 5) == plan_interruptions(30, "mix", 5)
    mixed = plan_interruptions(200, "mix", 1)
    assert {p.signal.name for p in mixed} == {"SIGTERM", "SIGKILL"}
    assert 0.1 < sum(p.phase == "start-up" for p in mixed) / 200 < 0.3
    terms = plan_interruptions(200, "term", 1)
    assert {p.signal.name for p in terms} == {"SIGTERM"}
    assert [(p.phase, p.fraction) for p in terms] == [(p.phase, p.fraction) for p in mixed]
    with pytest.raises(ValueError, match="--signal both"):
        plan_interruptions(3, "both", 1)
