"""What torture plans, measures and finds, and how it is said."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

DOCS = "docs/torture.md"
RUNBOOK = "runbooks/preemption.md"
EXACT, DIVERGED, INCONCLUSIVE = "EXACT", "DIVERGED", "INCONCLUSIVE"
EXIT_CODES = {EXACT: 0, DIVERGED: 1, INCONCLUSIVE: 3}  # 2: TortureError or bad usage
LANDINGS = {"training": "during training", "start-up": "in start-up (before training)",
            "after training": "after training finished",
            "ignored": "ignored (the start went on and exited 0)",
            "missed": "missed (the start had finished)"}
_STREAMS = {"python": "Python's random", "numpy": "numpy's global generator",
            "torch": "torch's CPU generator", "cuda": "torch's CUDA generators"}


class TortureError(Exception):
    """A run failed on its own, or the command cannot be tortured (CLI exit code 2).

    log: the output of the start that failed, if one did; its last lines end the message.
    """

    def __init__(self, message: str, log: Path | None = None, tail: str = "") -> None:
        self.log = log
        if log is not None:
            message += f"\n--- last lines of {log} ---\n{tail}"
        super().__init__(message)


@dataclass(frozen=True)
class PlannedInterruption:
    """One interruption as the seed draws it, before any process runs.

    signal: SIGTERM or SIGKILL. phase: "training" or "start-up".
    fraction: where in its window, in [0, 1): the start-up time, or its stretch of steps.
    lag: in [0, 1), for "training": once the start has logged its target step, the signal
        waits this share of the reference's mean step time, so that it lands anywhere in
        a step or a save.
    """

    signal: signal.Signals
    phase: str
    fraction: float
    lag: float = 0.0


@dataclass(frozen=True)
class ReferenceRun:
    """What the uninterrupted run measured; the interruptions are planned with it.

    elapsed_s: launch to exit. startup_s: launch to its ``training_started`` event.
    step_s: mean seconds per step, checkpoints included. num_steps: its final step (the
    training interruptions are aimed at steps below it). world_size: ranks of its final
    checkpoint.
    """

    elapsed_s: float
    startup_s: float
    step_s: float
    num_steps: int
    world_size: int


@dataclass(frozen=True)
class Interruption:
    """One interruption of the tortured run, as it happened.

    number: 1-based; interruption k hits start k. phase: where it was aimed.
    delay_s: seconds after launch ("start-up"), or after the start had logged its
        target step ("training").
    landed: where the interruption hit (for a SIGTERM ignored until the SIGKILL after
        the grace period, where that SIGKILL hit): "training" | "start-up" (training had
        not begun) | "after training" (the start had written ``training_finished``, or
        resumed the final checkpoint) | "ignored" (the start went on and exited 0) |
        "missed" (it exited 0 before the signal).
    resumed_from: the checkpoint step this start resumed from (None: fresh, or not yet).
    checkpoint_step: the newest checkpoint committed when the signal was sent, or None.
    exit: how the start ended ("exit 143", "killed by SIGKILL", ...).
    preempted_step, preempted_saved: from the start's ``preempted`` event, if any.
    forced: still running ``grace`` seconds after SIGTERM, so SIGKILLed.
    finished: the start finished training (wrote ``training_finished``).
    target_step: for "training", the step it was aimed at: the signal goes once the
        start has logged a step >= it in metrics.jsonl (None: "start-up").
    step: the newest step the start had logged when the signal was sent (None: none).
        Lines reach the file in bursts (at each checkpoint and at least once a second),
        so the start may have been a little further.
    """

    number: int
    signal: str
    phase: str
    delay_s: float
    landed: str
    resumed_from: int | None
    checkpoint_step: int | None
    exit: str
    preempted_step: int | None = None
    preempted_saved: bool | None = None
    forced: bool = False
    finished: bool = False
    target_step: int | None = None
    step: int | None = None

    def describe(self, total: int) -> str:
        start = "fresh start" if self.resumed_from is None else f"from step {self.resumed_from}"
        if self.phase == "start-up":
            when = f"{self.delay_s:.2f}s after launch"
        elif self.step is None:
            when = f"aimed at step {self.target_step} ({start})"
        else:
            when = f"at step {self.step} (aimed at step {self.target_step}, {start})"
        where = LANDINGS[self.landed]
        if self.forced:
            where = f"still running after --grace, SIGKILLed {where}"
        outcome = self.exit
        if self.preempted_step is not None:
            saved = "saved" if self.preempted_saved else "not saved"
            outcome += f", preempted at step {self.preempted_step} ({saved})"
        elif self.signal == "SIGTERM" and self.landed == "training" and not self.forced:
            outcome += ", no preempted event"
        checkpoint = "none" if self.checkpoint_step is None else f"step {self.checkpoint_step}"
        return (f"interruption {self.number}/{total}: {self.signal} {when} -> {where}; "
                f"newest checkpoint then: {checkpoint}; {outcome}")


@dataclass(frozen=True)
class Divergence:
    """The first difference found between the runs.

    step: the metrics step, or the final checkpoint's step.
    what: "loss" | "lr" | "missing" | "extra" (a step only one run logged) |
        "checkpoint" (the final checkpoints' step or world size differ, or the tortured
        one does not load) | "tensor" | "state".
    reference, tortured: both sides, as text.
    rank, name: for "tensor" and "state", the rank and the tensor name or state path.
    context: for a metrics line, which start wrote it and where it had resumed from.
    """

    step: int | None
    what: str
    reference: str
    tortured: str
    rank: int | None = None
    name: str | None = None
    context: str = ""

    def __str__(self) -> str:
        if self.what in ("loss", "lr", "missing", "extra"):
            text = f"at step {self.step}: "
            if self.what == "missing":
                text += f"in the reference ({self.reference}), absent from the tortured run"
            elif self.what == "extra":
                text += f"absent from the reference, the tortured run logged {self.tortured}"
            else:
                text += f"{self.what} {self.reference} (reference) != {self.tortured} (tortured)"
            return text + (f", {self.context}" if self.context else "")
        where = f"in the final checkpoint (step {self.step})"
        if self.what == "checkpoint":
            return f"{where}: {self.reference} (reference) vs {self.tortured} (tortured)"
        return (f"{where}: rank {self.rank} {self.what} {self.name}: {self.reference} "
                f"(reference) vs {self.tortured} (tortured)")


@dataclass(frozen=True)
class Comparison:
    """Two runs compared bit for bit.

    num_steps: steps the reference logged. num_lines: tortured metrics lines compared
    (a replayed step's lines included). num_torn: tortured fragments cut short by a kill,
    skipped. checkpoint_step, world_size: the reference's final checkpoint.
    num_tensors: tensors compared over all ranks; num_tensors_differing: how many differ.
    metrics, checkpoint: the first difference in each, or None.
    only_rng: when the final checkpoints differ in the process-wide RNG streams the
        trainer saves and nowhere else, those streams ("python", "numpy", "torch",
        "cuda"); else empty.
    """

    num_steps: int
    num_lines: int
    num_torn: int
    checkpoint_step: int | None
    world_size: int | None
    num_tensors: int
    num_tensors_differing: int
    metrics: Divergence | None
    checkpoint: Divergence | None
    only_rng: tuple[str, ...] = ()

    @property
    def first(self) -> Divergence | None:
        return self.metrics or self.checkpoint


@dataclass(frozen=True)
class FreshStarts:
    """Two starts that resumed nothing, side by side: the first checkpoint each run
    committed (the reference's, and the tortured run's), compared on the process-wide RNG
    streams the trainer saved in it, on every rank.

    step: that checkpoint's step, the same in both runs.
    differing: the streams that differ on some rank ("python", "numpy", "torch",
        "cuda"); empty: none.
    """

    step: int
    differing: tuple[str, ...]


@dataclass(frozen=True)
class TortureReport:
    """What ``run_torture`` did and found; ``verdict`` and ``exit_code`` sum it up.

    seed: drew the interruptions. work_dir: reference/, tortured/, one log per start.
    kept: whether work_dir is still there. num_planned: interruptions asked for.
    fresh_starts: the evidence for ``unseeded``, when both runs' first checkpoints could
        be read at the same step (None: not).
    """

    seed: int
    work_dir: Path
    kept: bool
    reference: ReferenceRun
    interruptions: tuple[Interruption, ...]
    num_planned: int
    comparison: Comparison
    fresh_starts: FreshStarts | None = None

    @property
    def unseeded(self) -> bool:
        """The runs differ only in process-wide RNG streams, and two starts that resumed
        nothing already differ in each of them: the job does not seed them."""
        c, fresh = self.comparison, self.fresh_starts
        return (c.metrics is None and c.checkpoint is not None and bool(c.only_rng)
                and fresh is not None and set(c.only_rng) <= set(fresh.differing))

    @property
    def num_in_training(self) -> int:
        return sum(i.landed == "training" for i in self.interruptions)

    @property
    def verdict(self) -> str:
        if self.comparison.first is not None:
            return DIVERGED
        return EXACT if self.num_in_training else INCONCLUSIVE

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def summary(self) -> list[str]:
        """The closing lines: where the interruptions landed, what was compared, verdict."""
        c = self.comparison
        counts = {k: sum(i.landed == k for i in self.interruptions) for k in LANDINGS}
        landed = ", ".join(f"{n} {LANDINGS[k]}" for k, n in counts.items() if n) or "nowhere"
        lines = [f"interruptions: {len(self.interruptions)} of {self.num_planned} made; "
                 f"landed {landed}"]
        if len(self.interruptions) < self.num_planned:
            lines.append("  (the tortured run had finished training: the rest were not made)")
        if counts["ignored"]:
            lines.append(f"  ({counts['ignored']} start(s) went on to exit 0 after the signal: "
                         f"a SIGTERM the command ignores interrupts nothing; see {RUNBOOK})")
        torn = f", {c.num_torn} cut short by a kill and skipped" if c.num_torn else ""
        differing = f", {c.num_tensors_differing} differ" if c.num_tensors_differing else ""
        lines.append(f"compared: {c.num_steps} steps, {c.num_lines} tortured metrics lines "
                     f"({c.num_lines - c.num_steps} replayed{torn}); final checkpoint step "
                     f"{c.checkpoint_step}, {c.world_size} rank(s), {c.num_tensors} "
                     f"tensors{differing}")
        if c.metrics is not None and c.checkpoint is not None:
            lines.append(f"also {c.checkpoint}")
        lines.append(f"VERDICT: {self.verdict}{self._verdict_detail()}")
        if self.unseeded and self.fresh_starts is not None:
            streams = " and ".join(_STREAMS[s] for s in self.comparison.only_rng)
            lines.append(f"unseeded: seed it with ht.seed_everything(SEED) at the top of the "
                         f"script, or HardenedTrainer(seed=SEED): {streams} already differ "
                         f"between two starts that resumed nothing (the first checkpoint of "
                         f"each run, step {self.fresh_starts.step}); see {DOCS}")
        elif self.verdict == DIVERGED:
            lines.append("state the checkpoint does not hold (a private random generator, a "
                         f"counter in a global) is the usual cause; see {DOCS} and {RUNBOOK}")
        elif self.verdict == INCONCLUSIVE:
            lines.append("give the command more steps (or slower ones) or more --kills; see "
                         f"{DOCS}")
        if self.kept:
            lines.append(f"work dir: {self.work_dir} (both run dirs, one log per start)")
        return lines

    def _verdict_detail(self) -> str:
        first = self.comparison.first
        if first is not None:
            return f" {first}"
        if self.verdict == INCONCLUSIVE:
            return ": the runs are equal, but no interruption landed during training"
        return (f": every loss and lr of {self.comparison.num_steps} steps and the final "
                f"checkpoint equal bit for bit, after {self.num_in_training} "
                "interruption(s) during training")
