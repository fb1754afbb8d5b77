"""The torture itself: the reference run, then the interrupted run, then compare_runs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hardtrain.checkpoint import CheckpointStore
from hardtrain.torture._compare import (
    NoEvents,
    compare_runs,
)
from hardtrain.torture._jobs import (
    KILL_WAIT_S,
    RUN_DIR_VAR,
    Job,
    end_job,
    exit_text,
    launched,
)
from hardtrain.torture._logs import (
    StartRecord,
    first,
    newest_checkpoint,
    rank0,
    read_jsonl,
    record_start,
    start_events,
)
from hardtrain.torture._reports import (
    DOCS,
    EXACT,
    Interruption,
    PlannedInterruption,
    ReferenceRun,
    TortureReport,
)
from hardtrain.torture._watch import (
    BEGAN,
    FIRSTS,
    FirstCheckpoint,
    LoggedSteps,
    await_step,
    await_training,
    wait_exit,
)

SIGNAL_MODES = ("term", "kill", "mix")
PLACEHOLDER = "{run_dir}"
_STARTUP_SHARE = 0.2  # of the interruptions, aimed at start-up
_TRAINING_SPAN = 0.9  # training targets lie in this first share of the steps


def plan_interruptions(num_kills: int, signals: str, seed: int) -> list[PlannedInterruption]:
    """The interruptions ``seed`` draws: each one's signal, phase, fraction and lag. Four
    draws per interruption whatever ``signals`` is, so a seed aims at the same steps."""
    if signals not in SIGNAL_MODES:
        raise ValueError(f"--signal {signals}: expected one of {', '.join(SIGNAL_MODES)}")
    rng = random.Random(seed)
    planned = []
    for _ in range(num_kills):
        coin = rng.random()
        term = coin < 0.5 if signals == "mix" else signals == "term"
        phase = "start-up" if rng.random() < _STARTUP_SHARE else "training"
        fraction, lag = rng.random(), rng.random()
        planned.append(PlannedInterruption(signal.SIGTERM if term else signal.SIGKILL,
                                           phase, fraction, lag))
    return planned


def target_step(index: int, num_training: int, fraction: float, resumed_from: int,
                num_steps: int) -> int:
    """The step that the ``index``-th (0-based) of ``num_training`` training interruptions
    waits for, in a start that began training at step ``resumed_from`` of a run of
    ``num_steps``: a step of its stretch of the first 90% of the steps or, if the start
    is past that already (a SIGTERM saved further than planned), a step of the stretch
    ahead (never past 90% of what is left). Past ``num_steps`` when the run had finished."""
    stretch = _TRAINING_SPAN * num_steps / num_training
    planned = int((index + fraction) * stretch) + 1
    if planned > resumed_from:
        return planned
    ahead = _TRAINING_SPAN * max(0, num_steps - resumed_from)
    return resumed_from + 1 + int(fraction * min(stretch, ahead))


def run_torture(
    command: Sequence[str],
    *,
    num_kills: int = 5,
    signals: str = "mix",
    seed: int | None = None,
    grace_s: float = 30.0,
    timeout_s: float | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    keep: bool = False,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] = print,
) -> TortureReport:
    """Run ``command`` uninterrupted, then from scratch interrupted ``num_kills`` times,
    and compare the two runs bit for bit.

    num_kills: interruptions (>= 1). signals: "term", "kill" or "mix" (each at random).
    seed: draws the interruptions (None: a random one; the output says which).
    grace_s: after SIGTERM, seconds until every process left is SIGKILLed (> 0).
    timeout_s: limit for each start, in seconds (None: 3x the reference run + 60 for the
        tortured starts, none for the reference).
    work_dir: gets reference/, tortured/ and one log per start (None: a new temp dir);
        removed after an EXACT verdict unless ``keep``, else kept.
    env: the command's environment (None: this process's).
    echo: gets a line per stage and per interruption, as they happen.

    Raises TortureError when a run fails on its own or cannot be compared, ValueError on
    bad arguments.
    """
    command = list(command)
    _check_args(command, num_kills, grace_s, timeout_s)
    seed = random.SystemRandom().randrange(2**32) if seed is None else seed
    plan = plan_interruptions(num_kills, signals, seed)
    work, created = _make_work_dir(work_dir)
    base_env = dict(os.environ if env is None else env)
    echo(f"hardtrain torture: {num_kills} interruption(s), --signal {signals}, --seed {seed}")
    echo(f"work dir: {work}")
    if not any(PLACEHOLDER in arg for arg in command):
        echo(f"note: no {PLACEHOLDER} in the command: it must take its run directory from "
             f"${RUN_DIR_VAR}")
    try:
        ref_first = FirstCheckpoint(work, "reference")
        reference = _run_reference(command, work, base_env, timeout_s, ref_first)
        echo(f"reference: {reference.num_steps} steps in {reference.elapsed_s:.1f}s (start-up "
             f"{reference.startup_s:.1f}s, {reference.step_s * 1000:.1f} ms/step), "
             f"{reference.world_size} rank(s)")
        limit_s = timeout_s if timeout_s is not None else 3 * reference.elapsed_s + 60
        tor_first = FirstCheckpoint(work, "tortured")
        starts, interruptions = _run_tortured(command, work, base_env, plan, reference,
                                              grace_s, limit_s, echo, tor_first)
        comparison = compare_runs(work / "reference", work / "tortured", starts)
        fresh = None
        if comparison.metrics is None and comparison.only_rng:
            fresh = ref_first.beside(tor_first)
    finally:
        shutil.rmtree(work / FIRSTS, ignore_errors=True)
    report = TortureReport(seed, work, True, reference, tuple(interruptions), num_kills,
                           comparison, fresh)
    if report.verdict == EXACT and not keep:
        _remove_work_dir(work, created)
        report = dataclasses.replace(report, kept=False)
    return report


def _check_args(command: list[str], num_kills: int, grace_s: float,
                timeout_s: float | None) -> None:
    if not command:
        raise ValueError(f"no command to torture: give it after --, e.g. hardtrain torture "
                         f"-- python train.py --run-dir {PLACEHOLDER}")
    if isinstance(num_kills, bool) or not isinstance(num_kills, int) or num_kills < 1:
        raise ValueError(f"--kills {num_kills}: must be an int >= 1")
    if not grace_s > 0:
        raise ValueError(f"--grace {grace_s}: must be > 0 seconds")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"--timeout {timeout_s}: must be > 0 seconds")


def _make_work_dir(work_dir: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The work dir, and whether it was made here."""
    if work_dir is None:
        return Path(tempfile.mkdtemp(prefix="hardtrain-torture-")).resolve(), True
    work = Path(work_dir).resolve()
    busy = [p.name for p in (work / "reference", work / "tortured") if p.exists()]
    if busy:
        raise ValueError(f"--work-dir {work} already holds {' and '.join(busy)}/ from an "
                         "earlier torture; remove them or give another --work-dir")
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    return work, created


def _remove_work_dir(work: Path, created: bool) -> None:
    for name in ("reference", "tortured"):
        shutil.rmtree(work / name, ignore_errors=True)
    for log in work.glob("*.log"):
        log.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            work.rmdir()


def _argv(command: list[str], run_dir: Path) -> list[str]:
    return [arg.replace(PLACEHOLDER, str(run_dir)) for arg in command]


# --------------------------------------------------------------------------- reference


def _run_reference(command: list[str], work: Path, env: dict[str, str],
                   timeout_s: float | None, first_checkpoint: FirstCheckpoint) -> ReferenceRun:
    run_dir = work / "reference"
    run_dir.mkdir()
    launched_at = time.time()
    with launched(_argv(command, run_dir), env, run_dir, work / "reference.log") as job:
        code = wait_exit(job, timeout_s, first_checkpoint)
        if code is None:
            raise job.fail(f"the reference run did not finish within --timeout {timeout_s:g}s")
        end_job(job, grace_s=KILL_WAIT_S)
        elapsed_s = time.time() - launched_at
        if code != 0:
            raise job.fail(f"the reference run (the command, uninterrupted) ended on its own "
                           f"({exit_text(code)}); it must run to the end before it can be "
                           "tortured")
        return _measure(job, launched_at, elapsed_s)


def _measure(job: Job, launched_at: float, elapsed_s: float) -> ReferenceRun:
    """The reference's timings and size, from its events and checkpoints."""
    run_dir = job.run_dir
    events = rank0(read_jsonl(run_dir / "events.jsonl")[0])
    started, finished = first(events, "training_started"), first(events, "training_finished")
    if started is None or finished is None:
        raise job.fail(
            f"the reference run wrote no training_started and training_finished events to "
            f"{run_dir}/events.jsonl: pass the run directory ({PLACEHOLDER} in the command, "
            f"or ${RUN_DIR_VAR}) to HardenedTrainer as run_dir. See {DOCS}")
    if not (run_dir / "metrics.jsonl").exists():
        raise job.fail(f"the reference run wrote no {run_dir}/metrics.jsonl. See {DOCS}")
    infos = CheckpointStore(run_dir, events=NoEvents()).list()
    if not infos:
        raise job.fail(f"the reference run committed no checkpoint in {run_dir}, and torture "
                       "compares final checkpoints: give HardenedTrainer a CheckpointPolicy")
    num_steps = int(finished.get("step") or 0)
    train_s = float(finished["time"]) - float(started["time"])
    return ReferenceRun(elapsed_s=elapsed_s,
                        startup_s=max(0.0, float(started["time"]) - launched_at),
                        step_s=max(0.0, train_s) / max(1, num_steps), num_steps=num_steps,
                        world_size=infos[-1].world_size or 1)


# ---------------------------------------------------------------------------- tortured


def _run_tortured(command: list[str], work: Path, env: dict[str, str],
                  plan: list[PlannedInterruption], reference: ReferenceRun, grace_s: float,
                  limit_s: float, echo: Callable[[str], None],
                  first_checkpoint: FirstCheckpoint,
                  ) -> tuple[list[StartRecord], list[Interruption]]:
    """Start the command once per planned interruption and interrupt it, then once more
    to the end. Stops interrupting once the run has finished training."""
    run_dir = work / "tortured"
    run_dir.mkdir()
    argv = _argv(command, run_dir)
    num_training = sum(p.phase == "training" for p in plan)
    starts: list[StartRecord] = []
    interruptions: list[Interruption] = []
    for planned in plan:
        start = record_start(run_dir, len(starts) + 1)
        starts.append(start)
        index = sum(p.phase == "training" for p in plan[: start.number - 1])
        with launched(argv, env, run_dir, work / f"tortured-{start.number:02d}.log") as job:
            interruption = _interrupt(job, start, planned, reference, index, num_training,
                                      grace_s, limit_s, first_checkpoint)
        first_checkpoint.poll()  # one committed as the start went: retention is over
        interruptions.append(interruption)
        echo(interruption.describe(len(plan)))
        if interruption.finished or interruption.landed in ("after training", "missed"):
            break  # training has finished: nothing left to interrupt
    start = record_start(run_dir, len(starts) + 1)
    starts.append(start)
    with launched(argv, env, run_dir, work / f"tortured-{start.number:02d}.log") as job:
        code = wait_exit(job, limit_s, first_checkpoint)
        what = f"start {start.number} of the tortured run (the last, left to finish)"
        if code is None:
            raise job.fail(f"{what} did not finish within {limit_s:.0f}s (--timeout)")
        end_job(job, grace_s=KILL_WAIT_S)
        if code != 0:
            raise job.fail(f"{what} ended on its own ({exit_text(code)})")
    first_checkpoint.poll()
    resumed = first(start_events(run_dir, start), "resumed")
    where = "fresh" if resumed is None else f"resumed from step {resumed.get('from_step')}"
    echo(f"start {start.number} ({where}) ran to the end: exit 0")
    return starts, interruptions


def _interrupt(job: Job, start: StartRecord, planned: PlannedInterruption,
               reference: ReferenceRun, training_index: int, num_training: int,
               grace_s: float, limit_s: float, first_checkpoint: FirstCheckpoint,
               ) -> Interruption:
    """Wait for the planned moment (an instant of start-up, or the start's metrics.jsonl
    reaching the target step), send the signal, see the whole job gone, and tell where
    the signal landed from this start's events."""
    resumed_from, target, logged = None, None, LoggedSteps(job.run_dir, start)
    if planned.phase == "start-up":
        delay_s = planned.fraction * reference.startup_s
        when = min(job.launched + delay_s, job.launched + limit_s)
    else:
        began = await_training(job, start, limit_s, first_checkpoint)
        if began is None:  # exited 0 without training: the run had finished
            return _missed(job, start, planned, 0.0, None)
        resumed_from = began.get("from_step")
        target = target_step(training_index, num_training, planned.fraction,
                             int(resumed_from or 0), reference.num_steps)
        if not await_step(job, start, target, limit_s, logged, first_checkpoint):
            return _missed(job, start, planned, 0.0, target)
        delay_s = planned.lag * reference.step_s  # into the step or save it logged at
        when = time.monotonic() + delay_s
    if not job.sleep_until(when, first_checkpoint.poll):
        return _missed(job, start, planned, delay_s, target)
    at_step = logged.newest()
    sent_at = time.time()
    if planned.signal == signal.SIGKILL:
        job.kill_all()
        end_job(job, grace_s=0.0)
        forced_at = None
    else:
        job.terminate_group()
        forced_at = end_job(job, grace_s=grace_s)
    # An ignored SIGTERM interrupts nothing; the SIGKILL after --grace does, when it comes.
    hit_at = sent_at if forced_at is None else forced_at
    events = start_events(job.run_dir, start)
    preempted = first(events, "preempted") or {}
    resumed = first(events, "resumed")
    if resumed is not None and resumed["time"] <= hit_at:
        resumed_from = resumed.get("from_step")
    return Interruption(
        number=start.number, signal=planned.signal.name, phase=planned.phase, delay_s=delay_s,
        landed=_where_landed(events, hit_at, reference.num_steps, job.proc.returncode),
        resumed_from=resumed_from, checkpoint_step=newest_checkpoint(job.run_dir, hit_at),
        exit=exit_text(job.proc.returncode), preempted_step=preempted.get("step"),
        preempted_saved=preempted.get("saved"), forced=forced_at is not None,
        finished=first(events, "training_finished") is not None, target_step=target,
        step=at_step,
    )


def _missed(job: Job, start: StartRecord, planned: PlannedInterruption, delay_s: float,
            target: int | None) -> Interruption:
    """The start exited before its signal: fine if it finished (exit 0). The newest
    checkpoint "then" is the newest committed when it had gone."""
    code = job.proc.wait()
    if code != 0:
        raise job.fail(f"start {start.number} of the tortured run ended on its own "
                       f"({exit_text(code)}) before its interruption")
    end_job(job, grace_s=KILL_WAIT_S)
    events = start_events(job.run_dir, start)
    resumed = first(events, "resumed")
    return Interruption(start.number, planned.signal.name, planned.phase, delay_s, "missed",
                        None if resumed is None else resumed.get("from_step"),
                        newest_checkpoint(job.run_dir, time.time()), exit_text(code),
                        finished=True, target_step=target)


def _where_landed(events: list[dict[str, Any]], hit_at: float, num_steps: int,
                  code: int | None) -> str:
    finished = first(events, "training_finished")
    if finished is not None and finished["time"] <= hit_at:
        return "after training"
    if code == 0:  # it went on as if nothing had happened
        return "ignored"
    began = first(events, *BEGAN)
    if began is None or began["time"] > hit_at:
        return "start-up"
    if int(began.get("from_step") or 0) >= num_steps:  # resumed a finished run
        return "after training"
    return "training"
