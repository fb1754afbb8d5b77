"""The feature protocol: the ballot's layout and verdict, and a step's error handled by a
feature (retry, reload), in one process. The ballot across ranks: tests/dist/test_ballot.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht
from hardtrain._loop.ballot import Ballot
from hardtrain._loop.protocol import (
    Context,
    Effect,
    Feature,
    Recovery,
    Slot,
    StepReport,
)
from tests.trainer.compare import assert_same_run, events


class Fixed(Feature):
    """Votes the same values every step."""

    def __init__(self, name: str, slots: tuple[Slot, ...], values: Sequence[int]) -> None:
        self.name = name
        self.slots = slots
        self.values = tuple(values)

    def vote(self, report: StepReport | None) -> Sequence[int]:
        return self.values


def test_the_ballot_lays_out_every_feature_and_reads_the_verdict() -> None:
    ballot = Ballot([
        Fixed("a", (Slot("a.skip", Effect.SKIP), Slot("a.low", Effect.VALUE, minimum=True)),
              [0, 7]),
        Feature(),  # no slots: not asked
        Fixed("b", (Slot("b.stop", Effect.STOP), Slot("b.save", Effect.SAVE)), [15, 1]),
        Fixed("c", (Slot("c.stop", Effect.STOP),), [2]),
    ], group=None)
    verdict = ballot.cast(None)
    assert [s.name for s in ballot.slots] == ["a.skip", "a.low", "b.stop", "b.save", "c.stop"]
    assert not verdict.skip and verdict.save
    assert verdict.stop == "b.stop"  # the first in table order
    assert verdict["a.low"] == 7 and verdict["b.stop"] == 15 and verdict["c.stop"] == 2
    assert ballot.cast(None) == verdict  # the tensor is reused, the values are the same


def test_the_ballot_refuses_shared_slot_names_and_short_votes() -> None:
    twice = (Slot("x", Effect.SKIP),)
    with pytest.raises(ValueError, match=r"\['x'\] are claimed by more than one feature"):
        Ballot([Fixed("a", twice, [0]), Fixed("b", twice, [0])], group=None)
    with pytest.raises(ValueError, match=r"b\.vote gave 1 values for its 2 slots"):
        Ballot([Fixed("b", (Slot("p", Effect.SKIP), Slot("q", Effect.SAVE)), [1])],
               group=None).cast(None)


class Flaky(Exception):
    """A step error that a feature knows how to recover from."""


class RecoverFlaky(Feature):
    """Answers ``Flaky`` with ``recovery``; anything else propagates."""

    name = "recover_flaky"

    def __init__(self, recovery: Recovery) -> None:
        self.recovery = recovery

    def on_error(self, ctx: Context, error: BaseException) -> Recovery | None:
        return self.recovery if isinstance(error, Flaky) else None


class WithRecovery(ht.HardenedTrainer):
    def __init__(self, *args: Any, recovery: Recovery, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recovery = recovery

    def _features(self) -> list[Feature]:
        return [*super()._features(), RecoverFlaky(self.recovery)]


def job(run_dir: Path, *, fail_at: set[int], recovery: Recovery | None, **extra: Any,
        ) -> tuple[ht.HardenedTrainer, Any]:
    ht.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g),
                                       torch.randn(24, 1, generator=g)),
        batch_size=4, shuffle=True)
    kwargs: dict[str, Any] = dict(
        checkpoint=ht.CheckpointPolicy(every=None, every_steps=3), seed=2, **extra)
    trainer = (ht.HardenedTrainer(model, opt, data, run_dir, **kwargs) if recovery is None
               else WithRecovery(model, opt, data, run_dir, recovery=recovery, **kwargs))
    failed: set[int] = set()

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        if trainer.step in fail_at - failed:  # once per step: a transient fault
            failed.add(trainer.step)
            raise Flaky(f"transient fault at step {trainer.step}")
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    return trainer, step_fn


def test_a_reload_after_a_step_error_continues_exactly(tmp_path: Path) -> None:
    straight, step_fn = job(tmp_path / "a", fail_at=set(), recovery=None)
    straight.fit(step_fn, max_steps=11)
    trainer, step_fn = job(tmp_path / "b", fail_at={7}, recovery=Recovery.RELOAD)
    assert trainer.fit(step_fn, max_steps=11).step == 11
    failed = events(tmp_path / "b", "step_failed")
    assert [(e["step"], e["recovery"], e["by"]) for e in failed] == [(7, "reload",
                                                                      "recover_flaky")]
    assert "Flaky: transient fault at step 7" in failed[0]["error"]
    assert_same_run(tmp_path / "a", tmp_path / "b")  # from step 6's checkpoint, as before


def test_a_retry_attempts_the_step_again_with_the_next_batch(tmp_path: Path) -> None:
    trainer, step_fn = job(tmp_path / "r", fail_at={2, 5}, recovery=Recovery.RETRY)
    result = trainer.fit(step_fn, max_steps=8)
    assert result.step == 8 and result.num_steps == 8
    assert [e["step"] for e in events(tmp_path / "r", "step_failed")] == [2, 5]


def test_an_error_no_feature_answers_propagates(tmp_path: Path) -> None:
    trainer, step_fn = job(tmp_path / "n", fail_at={2}, recovery=None)
    with pytest.raises(Flaky, match="step 2"):
        trainer.fit(step_fn, max_steps=8)
    assert not events(tmp_path / "n", "step_failed")


def test_a_run_without_a_feature_saves_the_state_it_loaded_for_it(tmp_path: Path) -> None:
    trainer, step_fn = job(tmp_path, fail_at=set(), recovery=None)
    trainer.fit(step_fn, max_steps=3)
    trainer, step_fn = job(tmp_path, fail_at=set(), recovery=None, nan=None)
    trainer.fit(step_fn, max_steps=6)  # resumed without the NaN guard
    saved = ht.CheckpointStore(tmp_path).load().state["hardtrain"]
    assert saved["step"] == 6 and saved["features"]["nan"] == {"num_rollbacks": 0}
