"""docs/porting.md, recipe by recipe, on examples/porting/gpt_style.py: a nanoGPT-style
loop (random batches from torch's global generator, the lr set by hand, evaluation every
N steps, a best validation loss, clipping, accumulation) ported to hardtrain. The port
resumes bit for bit and equals the original loop bit for bit; each "before" the guide
warns about does what the guide says it does.

In-process tests emulate a restart with new objects on the same run_dir (and ``fit`` to
a smaller ``max_steps``, or a SIGTERM, to stop); the first test runs the example as a
user does: a real process, SIGKILLed and started again with the same command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

import hardtrain as ht
from tests.trainer.compare import assert_same_run, final_state, losses

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "porting" / "gpt_style.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
TINY = ["--steps", "12", "--eval-interval", "4", "--eval-iters", "2", "--batch-size", "4",
        "--block-size", "8", "--n-embd", "16", "--warmup-iters", "3", "--grad-accum", "2",
        "--sample-chars", "8", "--save-every", "1h", "--save-every-steps", "4"]
STEPS, EVAL_EVERY, ACCUM, SEED = 12, 4, 2, 1337
LOST = "cannot be restored"

# python -c KILL SCRIPT STEP ARGS...: the example unchanged, SIGKILLed on entering step
# STEP + 1 (a fault keyed by step, as in tests/test_examples.py).
KILL = """
import os, runpy, signal, sys
import hardtrain as ht

script, kill_at = sys.argv[1], int(sys.argv[2])
fit = ht.HardenedTrainer.fit

def fit_killed_at_step(self, step_fn, *args, **kwargs):
    def step_or_die(batch):
        if self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(batch)
    return fit(self, step_or_die, *args, **kwargs)

ht.HardenedTrainer.fit = fit_killed_at_step
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""

pytestmark = pytest.mark.timeout(300)


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpt_style", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpt = load_example()
ARGS = gpt.parse_args(TINY)
CHARS, SPLITS = gpt.load_splits()


def evals_in(stdout: str) -> dict[int, str]:
    """The example's evaluation lines by step."""
    return {int(m[1]): m[0] for m in re.finditer(r"^step (\d+): .*$", stdout, re.MULTILINE)}


# ------------------------------------------------------------- the example, as a user runs it


def test_example_killed_and_restarted_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    def launch(run_dir: Path, kill_at: int | None = None) -> subprocess.CompletedProcess[str]:
        target = [str(SCRIPT)] if kill_at is None else ["-c", KILL, str(SCRIPT), str(kill_at)]
        return subprocess.run([sys.executable, *target, *TINY, "--run-dir", str(run_dir)],
                              capture_output=True, text=True, timeout=120, env=ENV)

    straight = launch(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert re.search(r"gpt_style: step 12/12, resumed_from=None, .* best val loss \d+\.\d{4}$",
                     straight.stdout.strip()), straight.stdout
    reference = evals_in(straight.stdout)
    assert sorted(reference) == [0, 4, 8, 12]  # once per step, though step_fn runs twice a step

    died = launch(tmp_path / "killed", kill_at=9)
    assert died.returncode == -signal.SIGKILL, died.stderr
    resumed = launch(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    # the save at 8 was async: it may not have committed before the kill in step 10
    found = re.search(r"resumed_from=(4|8),", resumed.stdout)
    assert found, resumed.stdout
    start = int(found[1])
    assert LOST not in resumed.stderr

    # Every loss, weight, AdamW moment, LR-schedule state, RNG stream and best_val_loss;
    # and the evaluations (their batches and samples drawn from the global generator).
    assert_same_run(tmp_path / "straight", tmp_path / "killed")
    assert evals_in(died.stdout) == {s: reference[s] for s in (0, 4, 8)}
    assert evals_in(resumed.stdout) == {s: reference[s] for s in reference if s >= start}


# ------------------------------------------------------------- the recipes, one by one


class Tokens:
    """A counter of the kind the guide says must go into extra_state."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


def endless_generator() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield gpt.get_batch(SPLITS["train"], ARGS.block_size, ARGS.batch_size)


class ShuffledOnce(gpt.RandomBatches):  # type: ignore[misc]
    """Claims to need no state, but draws an order once and walks it: a broken promise."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data, block = self.data, self.block_size
        order = torch.randperm(len(data) - block)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            ix = order[start : start + self.batch_size]
            yield (torch.stack([data[i : i + block] for i in ix]),
                   torch.stack([data[i + 1 : i + 1 + block] for i in ix]))


class Port:
    """The example's recipes put together in the test, with one of them swapped for the
    "before" the guide warns about. A new Port on the same run_dir is a restart."""

    def __init__(self, run_dir: Path, *, data: str = "random_batches", lr: str = "scheduler",
                 seed: str = "everything", counters: str = "extra_state") -> None:
        if seed == "everything":
            ht.seed_everything(SEED)
        else:
            torch.manual_seed(SEED)
        self.model = gpt.TinyGPT(len(CHARS), ARGS.block_size, ARGS.n_embd, ARGS.n_head,
                                 ARGS.dropout)
        self.lr_by_hand = lr == "by_hand"
        self.optimizer = gpt.configure_optimizers(
            self.model, ARGS.weight_decay, ARGS.learning_rate if self.lr_by_hand else 1.0)
        scheduler = None if self.lr_by_hand else torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: gpt.get_lr(it, ARGS))
        self.draw_in_step = data == "range"
        batches = {
            "random_batches": lambda: gpt.RandomBatches(SPLITS["train"], ARGS.block_size,
                                                        ARGS.batch_size),
            "generator": endless_generator,
            "range": lambda: range(10**9),  # a Sequence: positions restored by index
            "shuffled_once": lambda: ShuffledOnce(SPLITS["train"], ARGS.block_size,
                                                  ARGS.batch_size),
        }[data]()
        self.progress, self.tokens = gpt.Progress(), Tokens()
        extra = {"progress": self.progress, "tokens": self.tokens}
        self.trainer = ht.HardenedTrainer(
            self.model, self.optimizer, batches, run_dir, scheduler=scheduler,
            extra_state=extra if counters == "extra_state" else None, metadata=None,
            checkpoint=ht.CheckpointPolicy(every="1h", every_steps=4),
        )
        self.evals: dict[int, dict[str, float]] = {}
        self.calls: list[tuple[int, tuple[int, ...]]] = []  # (trainer.step, batch shape)

    def step_fn(self, batch: Any) -> torch.Tensor:
        trainer, progress = self.trainer, self.progress
        if self.lr_by_hand:  # the original's way; the guide says: a scheduler instead
            for group in self.optimizer.param_groups:
                group["lr"] = gpt.get_lr(trainer.step, ARGS)
        if trainer.step % EVAL_EVERY == 0 and progress.evaluated_at != trainer.step:
            progress.evaluated_at = trainer.step
            self.evals[trainer.step] = gpt.estimate_loss(self.model, SPLITS, ARGS)
            progress.best_val_loss = min(progress.best_val_loss, self.evals[trainer.step]["val"])
        if self.draw_in_step:
            batch = gpt.get_batch(SPLITS["train"], ARGS.block_size, ARGS.batch_size)
        x, y = batch
        self.calls.append((trainer.step, tuple(x.shape)))
        self.tokens.count += x.numel()
        loss: torch.Tensor = self.model(x, y)[1]
        return loss

    def fit(self, max_steps: int) -> ht.FitResult:
        return self.trainer.fit(self.step_fn, max_steps, grad_accum_steps=ACCUM,
                                max_grad_norm=ARGS.grad_clip)


def straight_and_resumed(tmp_path: Path, stop_at: int = 5, **variant: str
                         ) -> tuple[Port, Port, list[str]]:
    """An uninterrupted run to STEPS, and one stopped at ``stop_at`` and restarted (new
    objects) to STEPS; the warnings the restart issued."""
    straight = Port(tmp_path / "straight", **variant)
    assert straight.fit(STEPS).step == STEPS
    assert Port(tmp_path / "resumed", **variant).fit(stop_at).step == stop_at
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = Port(tmp_path / "resumed", **variant)
        assert resumed.fit(STEPS).resumed_from == stop_at
    return straight, resumed, [str(w.message) for w in caught]


@pytest.mark.parametrize("data", ["random_batches", "range"])
def test_random_batches_resume_exactly_and_without_a_warning(tmp_path: Path, data: str) -> None:
    straight, resumed, warned = straight_and_resumed(tmp_path, data=data)
    assert not [w for w in warned if LOST in w]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert resumed.evals[8] == straight.evals[8]


def test_a_generator_resumes_exactly_but_warns_that_its_position_is_lost(tmp_path: Path) -> None:
    _, _, warned = straight_and_resumed(tmp_path, data="generator")
    assert [w for w in warned if LOST in w and "(batch 10 of epoch 0)" in w]
    # The training is exact all the same: every loss and tensor...
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", state=False)
    # ... but the saved position counts from the restart, so the final checkpoints differ
    # there (hardtrain torture compares the JSON state too).
    a, b = (final_state(tmp_path / run).state["hardtrain"] for run in ("straight", "resumed"))
    assert a["data"]["batches_in_epoch"] == STEPS * ACCUM
    assert b["data"]["batches_in_epoch"] == (STEPS - 5) * ACCUM
    assert {**a, "data": None} == {**b, "data": None}


def test_an_empty_state_dict_on_data_with_an_order_of_its_own_is_not_exact(
    tmp_path: Path,
) -> None:
    _, _, warned = straight_and_resumed(tmp_path, data="shuffled_once")
    assert not [w for w in warned if LOST in w]  # nothing warns: the promise was the user's
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert all(a[s] == b[s] for s in range(1, 6))
    assert all(a[s] != b[s] for s in range(6, STEPS + 1))


def test_lr_through_a_scheduler_is_logged_for_the_step_that_used_it(tmp_path: Path) -> None:
    Port(tmp_path).fit(STEPS)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # line "step": s is the step that made trainer.step s; it ran with trainer.step s - 1
    assert [e["lr"] for e in logged] == [gpt.get_lr(s - 1, ARGS) for s in range(1, STEPS + 1)]

    # Why the optimizer is built with lr=1.0: LambdaLR's lr is initial lr * factor, and
    # learning_rate * (get_lr(it) / learning_rate) is not always get_lr(it).
    defaults = gpt.parse_args([])
    lr0 = defaults.learning_rate
    assert any(lr0 * (gpt.get_lr(i, defaults) / lr0) != gpt.get_lr(i, defaults)
               for i in range(defaults.steps))
    assert all(1.0 * gpt.get_lr(i, defaults) == gpt.get_lr(i, defaults)
               for i in range(defaults.steps))


def test_lr_set_inside_step_fn_is_used_on_time_but_logged_one_step_late(tmp_path: Path) -> None:
    by_scheduler = Port(tmp_path / "scheduler")  # built and run one after the other: both
    by_scheduler.fit(STEPS)                      # draw from the one global generator
    by_hand = Port(tmp_path / "by_hand", lr="by_hand")
    by_hand.fit(STEPS)
    # The same lr reached the optimizer at every step: the same weights, bit for bit...
    for name, tensor in by_scheduler.model.state_dict().items():
        assert torch.equal(tensor, by_hand.model.state_dict()[name]), name
    assert losses(tmp_path / "scheduler") == losses(tmp_path / "by_hand")
    # ... but metrics.jsonl read the lr before step_fn changed it: one step late, and the
    # first step shows the optimizer's initial lr.
    logged = [json.loads(line)["lr"]
              for line in (tmp_path / "by_hand" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == ARGS.learning_rate != gpt.get_lr(0, ARGS)
    assert logged[1:] == [gpt.get_lr(s - 2, ARGS) for s in range(2, STEPS + 1)]


def test_evaluation_every_n_steps_sees_trainer_step_and_replays_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpt.main([*TINY, "--run-dir", str(tmp_path / "straight")])
    reference = evals_in(capsys.readouterr().out)
    assert sorted(reference) == [0, 4, 8, 12]  # 12: after fit returned

    fit = ht.HardenedTrainer.fit

    def fit_sigterm_in_step_6(self: ht.HardenedTrainer, step_fn: Any, *args: Any,
                              **kwargs: Any) -> ht.FitResult:
        def step(batch: Any) -> Any:
            if self.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # a preemption: saved at step 6
            return step_fn(batch)
        return fit(self, step, *args, **kwargs)

    monkeypatch.setattr(ht.HardenedTrainer, "fit", fit_sigterm_in_step_6)
    with pytest.raises(ht.Preempted) as stopped:
        gpt.main([*TINY, "--run-dir", str(tmp_path / "resumed")])
    assert stopped.value.step == 6 and stopped.value.saved
    assert evals_in(capsys.readouterr().out) == {0: reference[0], 4: reference[4]}
    monkeypatch.setattr(ht.HardenedTrainer, "fit", fit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpt.main([*TINY, "--run-dir", str(tmp_path / "resumed")])
    out = capsys.readouterr().out
    assert "resumed_from=6," in out
    assert evals_in(out) == {8: reference[8], 12: reference[12]}  # same batches and samples
    assert not [w for w in caught if LOST in str(w.message)]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_counters_in_extra_state_survive_a_resume_and_others_are_lost_silently(
    tmp_path: Path,
) -> None:
    straight, resumed, warned = straight_and_resumed(tmp_path)
    tokens = STEPS * ACCUM * ARGS.batch_size * ARGS.block_size
    assert straight.tokens.count == resumed.tokens.count == tokens
    best = min(e["val"] for e in straight.evals.values())
    assert straight.progress.best_val_loss == resumed.progress.best_val_loss == best
    saved = final_state(tmp_path / "resumed").state["hardtrain"]["extra"]
    assert saved["progress"] == {"best_val_loss": best, "evaluated_at": 8}
    assert saved["tokens"] == {"count": tokens}

    _, lost, warned = straight_and_resumed(tmp_path / "lost", counters="globals")
    assert lost.tokens.count == (STEPS - 5) * ACCUM * ARGS.batch_size * ARGS.block_size
    assert lost.progress.best_val_loss == lost.evals[8]["val"]  # only what it saw itself
    assert not warned  # nothing says so

    with pytest.raises(TypeError, match=r"extra_state\['best'\]=dict: needs state_dict\(\)"):
        ht.HardenedTrainer(lost.model, lost.optimizer, [], tmp_path / "x",
                           extra_state={"best": {"best_val_loss": 1.0}})


def test_only_torch_manual_seed_makes_two_runs_of_one_command_differ(tmp_path: Path) -> None:
    def fresh_process() -> None:  # what a new interpreter does: seeded from the OS
        random.seed()
        np.random.seed()

    for seed in ("torch", "everything"):
        for name in ("a", "b"):
            fresh_process()
            Port(tmp_path / seed / name, seed=seed).fit(4)
    a, b = final_state(tmp_path / "torch" / "a"), final_state(tmp_path / "torch" / "b")
    # The training itself is the same (it draws from torch only)...
    assert losses(tmp_path / "torch" / "a") == losses(tmp_path / "torch" / "b")
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors
               if n.startswith("model/"))
    # ... but the saved Python and numpy streams differ, so a bit-for-bit comparison of the
    # two runs (hardtrain torture, tests/trainer/compare.py) reports a difference.
    rng_a, rng_b = a.state["hardtrain"]["rng"], b.state["hardtrain"]["rng"]
    assert rng_a["python"] != rng_b["python"]
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "torch" / "a", tmp_path / "torch" / "b")
    assert_same_run(tmp_path / "everything" / "a", tmp_path / "everything" / "b")


def test_gradient_accumulation_calls_step_fn_per_micro_batch_at_the_same_step(
    tmp_path: Path,
) -> None:
    port = Port(tmp_path)
    port.fit(3)
    shape = (ARGS.batch_size, ARGS.block_size)
    assert port.calls == [(0, shape), (0, shape), (1, shape), (1, shape), (2, shape), (2, shape)]


def test_the_port_equals_the_original_loop_bit_for_bit(tmp_path: Path) -> None:
    """The original, written as nanoGPT's train.py (first batch drawn before the loop, the
    next one right after each forward, lr set by hand, eval at the top of the iteration),
    clipping the parameters in the optimizer's order, as fit does."""
    torch.manual_seed(SEED)
    model = gpt.TinyGPT(len(CHARS), ARGS.block_size, ARGS.n_embd, ARGS.n_head, ARGS.dropout)
    optimizer = gpt.configure_optimizers(model, ARGS.weight_decay, ARGS.learning_rate)
    in_optimizer_order = [p for g in optimizer.param_groups for p in g["params"]]

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        return gpt.get_batch(SPLITS["train"], ARGS.block_size, ARGS.batch_size)

    original_losses, original_evals = {}, {}
    x, y = get_batch()
    for iter_num in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = gpt.get_lr(iter_num, ARGS)
        if iter_num % EVAL_EVERY == 0:
            original_evals[iter_num] = gpt.estimate_loss(model, SPLITS, ARGS)
        micro = []
        for _ in range(ACCUM):
            _, loss = model(x, y)
            micro.append(loss.detach())
            loss = loss / ACCUM
            x, y = get_batch()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(in_optimizer_order, ARGS.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        original_losses[iter_num + 1] = torch.stack(micro).mean().item()

    port = Port(tmp_path)
    port.fit(STEPS)
    assert losses(tmp_path) == original_losses
    assert port.evals == original_evals
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, port.model.state_dict()[name]), name


def test_the_total_norm_depends_on_the_order_of_the_parameters() -> None:
    """Why a port can differ from an original that clips model.parameters(): fit clips the
    optimizer's parameters, and nanoGPT's groups put matrices first."""
    differs = 0
    for seed in range(50):
        torch.manual_seed(seed)
        model = gpt.TinyGPT(len(CHARS), ARGS.block_size, ARGS.n_embd, ARGS.n_head, 0.0)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer = gpt.configure_optimizers(model, ARGS.weight_decay, 1.0)
        in_model_order = [p.grad for p in model.parameters()]
        in_optimizer_order = [p.grad for g in optimizer.param_groups for p in g["params"]]
        assert len(in_model_order) == len(in_optimizer_order)
        differs += not torch.equal(torch.nn.utils.get_total_norm(in_model_order),
                                   torch.nn.utils.get_total_norm(in_optimizer_order))
    assert differs > 0


def test_eval_only_restores_the_newest_checkpoint_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    def files() -> list[tuple[Path, int, int]]:
        return sorted((p.relative_to(tmp_path), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in tmp_path.rglob("*") if p.is_file())

    gpt.main([*TINY, "--run-dir", str(tmp_path)])
    trained = evals_in(capsys.readouterr().out)
    before = files()
    gpt.main([*TINY, "--run-dir", str(tmp_path), "--eval-only"])
    out = capsys.readouterr().out
    assert "gpt_style:" not in out  # it did not train
    # The final checkpoint's weights and RNG streams: the evaluation that followed fit.
    assert evals_in(out) == {STEPS: trained[STEPS]}
    assert files() == before
