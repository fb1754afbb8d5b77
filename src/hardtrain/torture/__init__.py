"""hardtrain torture: prove that a training command survives preemption exactly.

    hardtrain torture [--kills N] [--signal term|kill|mix] [--seed S] [--grace SECONDS]
                      [--timeout SECONDS] [--work-dir DIR] [--keep] -- CMD ...

Runs CMD once uninterrupted (WORK/reference), then again from scratch (WORK/tortured)
interrupted N times at random steps, starting it again with the same command after
each; the start after the last interruption must run to the end and exit 0. Then it
compares the two runs bit for bit: every line of metrics.jsonl against the reference's
loss and lr for its step (a step replayed after a resume is checked each time it was
logged), and the final checkpoint: its step, world size, and on every rank every
tensor's dtype, shape and bytes and the JSON state. It prints one line per
interruption, where it landed, the first divergent step and tensor, and a verdict.

CMD gets its run directory as {run_dir} in its arguments (replaced) and as
$HARDTRAIN_RUN_DIR. CMD may be a torchrun command. Each start runs in a session of its
own. SIGKILL hits every process of the start at once (a lost machine); SIGTERM goes to
CMD's process group (as Ctrl-C does; torchrun passes it on to its workers), and what
still runs --grace seconds later is SIGKILLed. No process of a start outlives it:
those that left the group are found by $HARDTRAIN_TORTURE_JOB in their environment.

One interruption in five is aimed at start-up (within the reference's start-up time),
the others at training: at a target step in each equal stretch of the first 90% of the
steps. The signal goes once the start's metrics.jsonl shows a step at or past its
target (lines reach the file at each checkpoint and at least once a second), plus a
random fraction of a step. Its events then say where each signal landed: start-up,
training, after training, or ignored (the start went on to exit 0). Once training has
finished, the remaining interruptions are not made. --seed reproduces the plan: the
signals and the target steps.

A divergence only in the process-wide RNG streams (Python's random, numpy's, torch's),
where the first checkpoints of both runs (fresh starts) already differ, is named
"unseeded": seed it with ht.seed_everything.

Exit codes: 0 EXACT (equal, and at least one interruption landed during training);
1 DIVERGED; 2 bad usage, or a run failed on its own (the tail of its log is printed);
3 INCONCLUSIVE (equal, but no interruption landed during training).
See docs/torture.md; after a divergence, also runbooks/preemption.md.
"""

from hardtrain.torture._compare import compare_runs
from hardtrain.torture._logs import StartRecord
from hardtrain.torture._reports import (
    DIVERGED,
    DOCS,
    EXACT,
    EXIT_CODES,
    INCONCLUSIVE,
    RUNBOOK,
    Comparison,
    Divergence,
    FreshStarts,
    Interruption,
    PlannedInterruption,
    ReferenceRun,
    TortureError,
    TortureReport,
)
from hardtrain.torture._run import PLACEHOLDER, SIGNAL_MODES, plan_interruptions, run_torture

__all__ = [
    "DIVERGED",
    "DOCS",
    "EXACT",
    "EXIT_CODES",
    "INCONCLUSIVE",
    "PLACEHOLDER",
    "RUNBOOK",
    "SIGNAL_MODES",
    "Comparison",
    "Divergence",
    "FreshStarts",
    "Interruption",
    "PlannedInterruption",
    "ReferenceRun",
    "StartRecord",
    "TortureError",
    "TortureReport",
    "compare_runs",
    "plan_interruptions",
    "run_torture",
]
