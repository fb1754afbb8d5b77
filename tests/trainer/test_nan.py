"""NaN/Inf steps: skipped on every rank, rolled back with the bad batches left out when
they persist, and a diagnosis when rollbacks run out. Bit-exact comparisons throughout."""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht
from tests.trainer.compare import assert_same_run, events

POISON = float("nan")


def batches(poisoned: set[int], removed: set[int] = frozenset()) -> list[list[torch.Tensor]]:  # type: ignore[assignment]
    """40 batches of (x, y); those in ``poisoned`` carry a NaN; those in ``removed`` are
    left out of the list (the reference stream)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(40):
        x, y = torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g)
        if i in poisoned:
            x[0, 0] = POISON
        if i not in removed:
            out.append([x, y])
    return out


def job(run_dir: Path, data: Any, *, nan: ht.NanPolicy | None = None, every: int = 5,
        **kwargs: Any) -> tuple[ht.HardenedTrainer, Callable[[Any], torch.Tensor]]:
    ht.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = ht.HardenedTrainer(
        model, opt, data, run_dir, scheduler=torch.optim.lr_scheduler.StepLR(opt, 4, 0.9),
        checkpoint=ht.CheckpointPolicy(every=None, every_steps=every, async_save=False),
        nan=nan or ht.NanPolicy(), seed=1, **kwargs,
    )

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    return trainer, step_fn


def test_one_nan_step_is_skipped_and_changes_no_weight(tmp_path: Path) -> None:
    trainer, step = job(tmp_path, batches({7}))
    seen: list[tuple[int, dict[str, torch.Tensor]]] = []

    def watched(batch: list[torch.Tensor]) -> torch.Tensor:
        seen.append((trainer.step, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
        return step(batch)

    result = trainer.fit(watched, max_steps=12)
    assert result.step == 12 and len(seen) == 13  # one attempt more than steps
    [skipped] = events(tmp_path, "step_skipped")
    assert skipped["step"] == 7 and skipped["reason"] == "loss" and skipped["ranks"] == [0]
    assert math.isnan(skipped["loss"])
    before, after = seen[7], seen[8]  # the attempt on batch 7, then the next one
    assert before[0] == after[0] == 7
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert not events(tmp_path, "rolled_back")
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert logged == list(range(1, 13))  # a skipped step is not a step


def test_a_poisoned_stretch_rolls_back_and_equals_the_stream_without_it(tmp_path: Path) -> None:
    """Batches 12-14 give NaN; after 3 skips the run goes back to the checkpoint at step
    10 and leaves out batches 10-14 (consumed since it). It must end exactly like a run
    over the same stream with those batches removed."""
    poisoned = {12, 13, 14}
    trainer, step = job(tmp_path / "run", batches(poisoned))
    assert trainer.fit(step, max_steps=30).step == 30
    [rolled] = events(tmp_path / "run", "rolled_back")
    assert rolled["from_step"] == 12 and rolled["to_step"] == 10
    assert rolled["skipped_batches"] == [[0, i] for i in range(10, 15)]
    reference, step = job(tmp_path / "ref", batches(set(), removed=set(range(10, 15))))
    assert reference.fit(step, max_steps=30).step == 30
    assert_same_run(tmp_path / "ref", tmp_path / "run", state=False)


def skip_list(run_dir: Path) -> list[list[int]]:
    state = ht.CheckpointStore(run_dir).load().state["hardtrain"]
    return state["data"]["skip"]


def test_a_restart_after_a_rollback_keeps_the_skip_list(tmp_path: Path) -> None:
    poisoned = {12, 13, 14}
    straight, step = job(tmp_path / "a", batches(poisoned))
    straight.fit(step, max_steps=30)
    stopped, step = job(tmp_path / "b", batches(poisoned))
    assert stopped.fit(step, max_steps=17).step == 17  # past the rollback, then stopped
    assert skip_list(tmp_path / "b") == [[0, i] for i in range(10, 15)]
    restarted, step = job(tmp_path / "b", batches(poisoned))
    assert restarted.fit(step, max_steps=30).resumed_from == 17
    assert restarted._state.cursor.skip == {(0, i) for i in range(10, 15)}
    assert skip_list(tmp_path / "b") == [[0, i] for i in range(10, 15)]
    assert len(events(tmp_path / "b", "rolled_back")) == 1
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_a_crash_right_after_a_rollback_replays_it_exactly(tmp_path: Path) -> None:
    poisoned = {12, 13, 14}
    straight, step = job(tmp_path / "a", batches(poisoned))
    straight.fit(step, max_steps=30)
    crashing, step = job(tmp_path / "b", batches(poisoned))

    def crash_after_rollback(batch: list[torch.Tensor]) -> torch.Tensor:
        if events(tmp_path / "b", "rolled_back"):
            raise RuntimeError("crash right after the rollback")
        return step(batch)

    with pytest.raises(RuntimeError, match="crash right after"):
        crashing.fit(crash_after_rollback, max_steps=30)
    assert [i.step for i in ht.CheckpointStore(tmp_path / "b").list()][-1] == 10  # kept
    restarted, step = job(tmp_path / "b", batches(poisoned))
    assert restarted.fit(step, max_steps=30).resumed_from == 10
    first, again = events(tmp_path / "b", "rolled_back")  # the same rollback, replayed
    assert first["skipped_batches"] == again["skipped_batches"]
    assert first["num_rollbacks"] == again["num_rollbacks"] == 1
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_a_preemption_in_a_nan_streak_saves_nothing_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    poisoned = {12, 13, 14}
    straight, step = job(tmp_path / "a", batches(poisoned))
    straight.fit(step, max_steps=30)
    stopped, step = job(tmp_path / "b", batches(poisoned))

    def term_in_the_streak(batch: list[torch.Tensor]) -> torch.Tensor:
        if torch.isnan(batch[0]).any() and not events(tmp_path / "b", "preemption_requested"):
            os.kill(os.getpid(), signal.SIGTERM)
        return step(batch)

    with pytest.raises(ht.Preempted) as raised:
        stopped.fit(term_in_the_streak, max_steps=30)
    assert raised.value.step == 12 and not raised.value.saved  # mid-streak: not saved
    restarted, step = job(tmp_path / "b", batches(poisoned))
    assert restarted.fit(step, max_steps=30).resumed_from == 10
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_rollbacks_run_out_into_a_diagnosis(tmp_path: Path) -> None:
    trainer, step = job(tmp_path, batches(set()), nan=ht.NanPolicy(max_rollbacks=1))

    def diverging(batch: list[torch.Tensor]) -> torch.Tensor:
        loss = step(batch)
        return loss * float("inf") if trainer.step >= 8 else loss

    with pytest.raises(ht.NonFiniteLossError) as raised:
        trainer.fit(diverging, max_steps=30)
    message = str(raised.value)
    assert "after 1 rollback(s)" in message and "at step 8" in message
    assert "first seen on rank 0 of 1" in message and "runbooks/nan-during-training.md" in message
    assert "recent steps" in message and "lr" in message
    assert len(events(tmp_path, "rolled_back")) == 1
    assert isinstance(raised.value, FloatingPointError)


@pytest.mark.parametrize("scaler", [None, "disabled"])
def test_nan_gradients_are_caught_through_the_norm(tmp_path: Path, scaler: str | None) -> None:
    """Also with a disabled GradScaler (``enabled=(dtype == "float16")``, as scripts build
    it for bf16 and fp32): it skips nothing, so the guard must."""
    disabled = torch.amp.GradScaler("cpu", enabled=False) if scaler else None
    trainer, step = job(tmp_path, batches(set()), scaler=disabled)

    first = next(trainer.model.parameters())
    fired: list[int] = []

    def bad_grad(batch: list[torch.Tensor]) -> torch.Tensor:
        loss = step(batch)
        if trainer.step == 4 and not fired:  # a finite loss (+ sqrt(0)) whose gradient is NaN
            fired.append(1)
            return loss + torch.sqrt(first * 0.0).sum()
        return loss

    trainer.fit(bad_grad, max_steps=6)
    [skipped] = events(tmp_path, "step_skipped")
    assert skipped["reason"] == "grad_norm" and skipped["step"] == 4
    assert math.isfinite(skipped["loss"]) and not math.isfinite(skipped["grad_norm"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    [finished] = events(tmp_path, "training_finished")
    assert finished["num_skipped"] == 1 and finished["num_scaler_skipped"] == 0


def test_a_grad_scalers_own_skip_is_not_counted_twice(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # overflows at first
    trainer, step = job(tmp_path, batches(set()), scaler=scaler)
    trainer.fit(step, max_steps=6, max_grad_norm=1.0)
    assert not events(tmp_path, "step_skipped")  # the scaler skipped its overflows itself
    [finished] = events(tmp_path, "training_finished")
    assert finished["num_scaler_skipped"] >= 1 and finished["num_skipped"] == 0
    assert scaler.get_scale() < 2.0**127


def test_spikes_are_skipped_like_nans(tmp_path: Path) -> None:
    nan = ht.NanPolicy(spike_zscore=4.0, spike_window=10)
    trainer, step = job(tmp_path, batches(set()), nan=nan)

    fired: list[int] = []

    def spiking(batch: list[torch.Tensor]) -> torch.Tensor:
        loss = step(batch)
        if trainer.step == 15 and not fired:
            fired.append(1)
            return loss * 1e6
        return loss

    trainer.fit(spiking, max_steps=20)
    [skipped] = events(tmp_path, "step_skipped")
    assert skipped["reason"] == "spike" and skipped["step"] == 15


def test_nan_none_trains_through_nans(tmp_path: Path) -> None:
    trainer, step = job(tmp_path, batches({3}), nan=None)
    trainer.nan = None
    trainer.fit(step, max_steps=5)
    assert not events(tmp_path, "step_skipped")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_consecutive": 0}, "max_consecutive=0"),
    ({"max_rollbacks": -1}, "max_rollbacks=-1"),
    ({"spike_zscore": 0}, "spike_zscore=0"),
    ({"spike_window": 3}, "spike_window=3"),
    ({"max_in_window": 5}, "give both"),
    ({"max_in_window": 5, "window": 2}, "window=2"),
    ({"skip_data": "yes"}, "skip_data='yes'"),
])
def test_invalid_nan_policy_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ht.NanPolicy(**kwargs)


def test_too_many_skips_in_a_window_roll_back_too(tmp_path: Path) -> None:
    """Batches 11 and 13 are bad, 12 is fine: never 3 in a row, but 2 within 5 attempts."""
    nan = ht.NanPolicy(max_consecutive=3, max_in_window=2, window=5)
    trainer, step = job(tmp_path, batches({11, 13}), nan=nan)
    trainer.fit(step, max_steps=20)
    [rolled] = events(tmp_path, "rolled_back")
    assert rolled["to_step"] == 10 and rolled["skipped_batches"] == [[0, i] for i in range(10, 14)]


def test_a_skip_with_a_grad_scaler_and_clipping_goes_on(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu")
    trainer, step = job(tmp_path, batches({7}), scaler=scaler)
    assert trainer.fit(step, max_steps=12, max_grad_norm=1.0).step == 12
    assert [e["step"] for e in events(tmp_path, "step_skipped")] == [7]


def test_the_rollback_count_survives_a_restart(tmp_path: Path) -> None:
    poisoned = {12, 13, 14}
    stopped, step = job(tmp_path, batches(poisoned), nan=ht.NanPolicy(max_rollbacks=1))
    assert stopped.fit(step, max_steps=17).step == 17  # one rollback, then stopped
    restarted, step = job(tmp_path, batches(poisoned), nan=ht.NanPolicy(max_rollbacks=1))

    def diverging(batch: list[torch.Tensor]) -> torch.Tensor:
        loss = step(batch)
        return loss * float("nan") if restarted.step >= 19 else loss

    with pytest.raises(ht.NonFiniteLossError, match="after 1 rollback"):
        restarted.fit(diverging, max_steps=30)  # the one rollback was spent before the stop
    assert len(events(tmp_path, "rolled_back")) == 1
