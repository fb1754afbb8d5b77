"""HardenedTrainer in one process: resume in place, triggers, logs, mismatches, modes."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hardtrain as ht
from tests.trainer.compare import assert_same_run, losses


class Ema:
    """extra_state: an exponential moving average of the weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def update(self) -> None:
        self.updates += 1
        for k, v in self.model.state_dict().items():
            self.shadow[k].mul_(0.9).add_(v, alpha=0.1)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def make(
    run_dir: Path | str,
    *,
    hidden: int = 16,
    optimizer: str = "adamw",
    workers: int = 0,
    generator: torch.Generator | None = None,
    persistent: bool = False,
    policy: ht.CheckpointPolicy | None = None,
    **kwargs: Any,
) -> tuple[ht.HardenedTrainer, Callable[[Any], torch.Tensor]]:
    """A fresh job, as a restarted script would build it."""
    ht.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Dropout(0.3),
                                torch.nn.Linear(hidden, 1))
    opt: torch.optim.Optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-2)
                                  if optimizer == "adamw" else
                                  torch.optim.SGD(model.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g))
    data = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=workers,
                      generator=generator, persistent_workers=persistent)
    ema = Ema(model)
    kwargs.setdefault("extra_state", {"ema": ema})
    trainer = ht.HardenedTrainer(
        model, opt, data, run_dir,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50),
        checkpoint=policy or ht.CheckpointPolicy(every=None, every_steps=4, async_save=False),
        seed=3, **kwargs,
    )

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if trainer.step > 0:
            ema.update()
        jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        return torch.nn.functional.mse_loss(model(x + jitter), y)

    return trainer, step_fn


def test_restart_continues_exactly(tmp_path: Path) -> None:
    trainer, step = make(tmp_path / "a")
    trainer.fit(step, max_steps=23)
    after_straight = torch.rand(3)
    first, step = make(tmp_path / "b")
    assert first.fit(step, max_steps=10).step == 10  # a run stopped at step 10 ...
    second, step = make(tmp_path / "b")
    result = second.fit(step, max_steps=23)  # ... and restarted with a larger goal
    assert result.resumed_from == 10 and result.num_steps == 13
    assert torch.equal(torch.rand(3), after_straight)  # the RNG stream continues exactly
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_loader_with_its_own_generator_and_workers_resumes_exactly(tmp_path: Path) -> None:
    def job(run_dir: Path) -> tuple[ht.HardenedTrainer, Callable[[Any], torch.Tensor]]:
        return make(run_dir, workers=2, generator=torch.Generator().manual_seed(9))

    trainer, step = job(tmp_path / "a")
    trainer.fit(step, max_steps=17)
    trainer, step = job(tmp_path / "b")
    trainer.fit(step, max_steps=13)  # mid-epoch (10 batches per epoch)
    trainer, step = job(tmp_path / "b")
    assert trainer.fit(step, max_steps=17).resumed_from == 13
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_fit_again_on_the_same_trainer_with_persistent_workers(tmp_path: Path) -> None:
    trainer, step = make(tmp_path / "a", workers=2, persistent=True)
    trainer.fit(step, max_steps=24)
    trainer, step = make(tmp_path / "b", workers=2, persistent=True)
    trainer.fit(step, max_steps=13)
    assert trainer.fit(step, max_steps=24).resumed_from == 13  # the same objects, continued
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_checkpoint_from_other_cuda_devices_is_a_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hardtrain.state

    real = hardtrain.state.capture_rng

    def with_two_gpus(generators: Any) -> dict[str, Any]:
        return {**real(generators), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}

    monkeypatch.setattr("hardtrain._loop.state.capture_rng", with_two_gpus)
    trainer, step = make(tmp_path)
    trainer.fit(step, max_steps=4)
    monkeypatch.undo()
    trainer, step = make(tmp_path)
    with pytest.raises(ht.CheckpointMismatchError, match=r"RNG state for 2 CUDA device\(s\), "
                       r"this process sees 0"):
        trainer.fit(step, max_steps=8)
    assert trainer.step == 0


def test_restarting_a_finished_run_loads_the_final_state_and_returns(tmp_path: Path) -> None:
    trainer, step = make(tmp_path)
    trainer.fit(step, max_steps=6)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    again, step = make(tmp_path)
    assert not torch.equal(again.model.state_dict()["0.weight"], weights["0.weight"])
    result = again.fit(step, max_steps=6)
    assert (result.step, result.num_steps, result.resumed_from) == (6, 0, 6)
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert len(losses(tmp_path)) == 6


def test_gradient_accumulation_clipping_and_scaler_resume_exactly(tmp_path: Path) -> None:
    def job(run_dir: Path) -> tuple[ht.HardenedTrainer, Callable[[Any], torch.Tensor]]:
        return make(run_dir, scaler=torch.amp.GradScaler("cpu"))

    options = {"grad_accum_steps": 3, "max_grad_norm": 0.05}
    trainer, step = job(tmp_path / "a")
    trainer.fit(step, max_steps=9, **options)
    trainer, step = job(tmp_path / "b")
    trainer.fit(step, max_steps=5, **options)
    trainer, step = job(tmp_path / "b")
    trainer.fit(step, max_steps=9, **options)
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_manual_steps_with_two_optimizers_resume_exactly(tmp_path: Path) -> None:
    def job(run_dir: Path) -> tuple[ht.HardenedTrainer, Callable[[Any], float]]:
        ht.seed_everything(0)
        gen, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-2)
        opt_d = torch.optim.SGD(disc.parameters(), lr=1e-2, momentum=0.9)
        models = torch.nn.ModuleDict({"g": gen, "d": disc})
        data = [torch.randn(4, 2) for _ in range(5)]
        trainer = ht.HardenedTrainer(
            models, {"g": opt_g, "d": opt_d}, data, run_dir,
            checkpoint=ht.CheckpointPolicy(every=None, every_steps=3, async_save=False),
        )

        def gan_step(real: torch.Tensor) -> float:
            fake = gen(torch.randn(4, 2))
            opt_d.zero_grad()
            d_loss = disc(fake.detach()).mean() - disc(real).mean()
            d_loss.backward()
            opt_d.step()
            opt_g.zero_grad()
            g_loss = -disc(fake).mean()
            g_loss.backward()
            opt_g.step()
            return float(d_loss.detach())

        return trainer, gan_step

    trainer, step = job(tmp_path / "a")
    trainer.fit(step, max_steps=12, manual=True)
    trainer, step = job(tmp_path / "b")
    trainer.fit(step, max_steps=7, manual=True)
    trainer, step = job(tmp_path / "b")
    assert trainer.fit(step, max_steps=12, manual=True).resumed_from == 7
    assert_same_run(tmp_path / "a", tmp_path / "b")


# -------------------------------------------------------------------------- the trigger


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_wall_clock_trigger_counts_time_between_saves_not_time_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    policy = ht.CheckpointPolicy(every="1min", keep_last=None, async_save=False)
    trainer, step = make(tmp_path, policy=policy, clock=clock)
    save = ht.CheckpointStore.save

    def slow_save(self: ht.CheckpointStore, *args: Any, **kwargs: Any) -> ht.CheckpointInfo:
        clock.now += 50  # saving takes 50 s: it must not count towards the next interval
        return save(self, *args, **kwargs)

    monkeypatch.setattr(ht.CheckpointStore, "save", slow_save)

    def timed_step(batch: Any) -> torch.Tensor:
        clock.now += 25  # each step takes 25 s
        return step(batch)

    trainer.fit(timed_step, max_steps=10)
    saved = [s.step for s in ht.CheckpointStore(tmp_path).list()]
    assert saved == [3, 6, 9, 10]  # 75 s >= 60 s after each save finished; then the final


def test_every_steps_and_every_together(tmp_path: Path) -> None:
    clock = FakeClock()
    policy = ht.CheckpointPolicy(every="100s", every_steps=4, keep_last=None, async_save=False)
    trainer, step = make(tmp_path, policy=policy, clock=clock)

    def timed_step(batch: Any) -> torch.Tensor:
        clock.now += 45
        return step(batch)

    trainer.fit(timed_step, max_steps=9)
    assert [s.step for s in ht.CheckpointStore(tmp_path).list()] == [3, 4, 7, 8, 9]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": -5}, "every=-5: must be > 0"),
    ({"every": 0}, "every=0: must be > 0"),
    ({"every": "soon"}, "every='soon': not a duration"),
    ({"every": "10 parsecs"}, "not a duration"),
    ({"every": None, "every_steps": None}, "every=None and every_steps=None"),
    ({"every_steps": 0}, "every_steps=0"),
    ({"every_steps": 2.5}, "every_steps=2.5"),
    ({"keep_last": 0}, "keep_last=0"),
    ({"async_save": "yes"}, "async_save='yes'"),
])
def test_invalid_checkpoint_policy_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ht.CheckpointPolicy(**kwargs)


def test_checkpoint_policy_durations() -> None:
    assert ht.CheckpointPolicy(every="90s").every_s == 90
    assert ht.CheckpointPolicy(every="30min").every_s == 1800
    assert ht.CheckpointPolicy(every="2h").every_s == 7200
    assert ht.CheckpointPolicy(every="1h30min").every_s == 5400
    assert ht.CheckpointPolicy(every=12.5).every_s == 12.5
    assert ht.CheckpointPolicy().every_s == 1800
    with pytest.raises(TypeError, match="every=True"):
        ht.CheckpointPolicy(every=True)


# ------------------------------------------------------------------------------- logs


def test_metrics_and_events(tmp_path: Path) -> None:
    trainer, step = make(tmp_path)
    result = trainer.fit(step, max_steps=5)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    assert set(lines[0]) == {"step", "loss", "lr", "step_time_s"}
    assert lines[-1]["loss"] == result.final_loss
    assert lines[0]["lr"] == 1e-2 and lines[-1]["lr"] < 1e-2  # the lr each step used
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[:2] == ["lease_acquired", "training_started"]
    assert names[-2:] == ["training_finished", "lease_released"]
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert [e["step"] for e in saved] == [4, 5]
    assert all(e["bytes"] > 0 and "blocking_s" in e and "persist_s" in e for e in saved)

    # damage the newest checkpoint: the restart falls back, says so, and replays step 5
    newest = tmp_path / "checkpoints" / "step-00000005" / "rank-00000.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    trainer, step = make(tmp_path)
    with pytest.warns(ht.CheckpointFallbackWarning):
        assert trainer.fit(step, max_steps=5).resumed_from == 4
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    rejected = next(e for e in events if e["event"] == "checkpoint_rejected")
    assert rejected["step"] == 5 and rejected["file"] == "rank-00000.safetensors"
    assert any(e["event"] == "resumed" and e["from_step"] == 4 for e in events)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5, 5]


def test_remote_run_dir_keeps_logs_locally_and_copies_them_up(tmp_path: Path) -> None:
    import fsspec

    url = f"memory://hardtrain-test/{tmp_path.name}"
    trainer, step = make(url, log_dir=tmp_path / "logs")
    trainer.fit(step, max_steps=6)
    fs = fsspec.filesystem("memory")
    remote = fs.cat_file(f"{url}/metrics.jsonl").decode()
    assert remote == (tmp_path / "logs" / "metrics.jsonl").read_text()
    assert len(remote.splitlines()) == 6
    assert b"checkpoint_saved" in fs.cat_file(f"{url}/events.jsonl")

    # a restart on another machine: no local logs; they are fetched, then continued
    trainer, step = make(url, log_dir=tmp_path / "elsewhere")
    assert trainer.fit(step, max_steps=8).resumed_from == 6
    steps = [json.loads(x)["step"] for x in fs.cat_file(f"{url}/metrics.jsonl").splitlines()]
    assert steps == list(range(1, 9))


# ---------------------------------------------------------------------- mismatches


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted((run_dir / "checkpoints").rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden": 8}, r"model 0\.weight: checkpoint has torch\.float32 \[16, 4\], the model has "
                    r"torch\.float32 \[8, 4\]"),
    ({"optimizer": "sgd"}, r"optimizer 'optimizer': checkpoint has torch\.optim\.adamw\.AdamW, "
                           r"this trainer has torch\.optim\.sgd\.SGD"),
    ({"extra_state": {}}, r"extra_state: checkpoint has \['ema'\], this trainer has \[\]"),
])
def test_resuming_into_something_else_is_an_error_and_touches_nothing(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    trainer, step = make(tmp_path)
    trainer.fit(step, max_steps=4)
    before = _files(tmp_path)
    other, step = make(tmp_path, **change)
    weights = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ht.CheckpointMismatchError, match=message) as e:
        other.fit(step, max_steps=8)
    assert "runbooks/resume-mismatch.md" in str(e.value)
    assert "Nothing was loaded or overwritten" in str(e.value)
    assert _files(tmp_path) == before
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert other.step == 0


def test_a_model_with_other_layers_names_the_keys(tmp_path: Path) -> None:
    trainer, step = make(tmp_path)
    trainer.fit(step, max_steps=4)
    trainer.model.add_module("3", torch.nn.Linear(1, 1))
    with pytest.raises(ht.CheckpointMismatchError, match=r"model keys missing from the "
                       r"checkpoint: 3\.weight, 3\.bias"):
        ht.HardenedTrainer(trainer.model, trainer.optimizers["optimizer"], trainer.data,
                           tmp_path, checkpoint=trainer.checkpoint).fit(step, max_steps=8)


# ---------------------------------------------------------------------- bad input


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    trainer, step = make(tmp_path)
    with pytest.raises(ValueError, match="max_steps=-1"):
        trainer.fit(step, max_steps=-1)
    with pytest.raises(ValueError, match="grad_accum_steps=0"):
        trainer.fit(step, max_steps=1, grad_accum_steps=0)
    with pytest.raises(ValueError, match="manual=True"):
        trainer.fit(step, max_steps=1, manual=True, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="extra_state"):
        make(tmp_path, extra_state={"counter": 3})
    with pytest.raises(TypeError, match="model=str"):
        ht.HardenedTrainer("model", trainer.optimizers["optimizer"], [], tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed=-1"):
        ht.HardenedTrainer(trainer.model, trainer.optimizers["optimizer"], [], tmp_path, seed=-1)
    assert not (tmp_path / "checkpoints").exists()  # the constructor opens nothing


def test_step_fn_must_return_the_loss_tensor(tmp_path: Path) -> None:
    trainer, _ = make(tmp_path)
    with pytest.raises(TypeError, match="step_fn returned float"):
        trainer.fit(lambda batch: 1.0, max_steps=2)


def test_an_iterator_that_runs_dry_is_a_clear_error(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = iter([torch.ones(1, 2)] * 3)
    trainer = ht.HardenedTrainer(model, opt, data, tmp_path, checkpoint=None)
    with pytest.raises(ValueError, match="gave no batch in epoch 1"):
        trainer.fit(lambda x: model(x).sum(), max_steps=5)
    assert trainer.step == 3


def test_new_epochs_call_set_epoch(tmp_path: Path) -> None:
    class Sampler(torch.utils.data.Sampler[int]):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(4))

        def __len__(self) -> int:
            return 4

    sampler = Sampler()
    model = torch.nn.Linear(1, 1)
    data = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2, sampler=sampler)
    trainer = ht.HardenedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                                 tmp_path, checkpoint=None)
    trainer.fit(lambda b: model(b[0]).sum(), max_steps=5)
    assert sampler.epochs == [0, 1, 2]


# --------------------------------------------------------------------- determinism


def test_seed_everything_seeds_every_generator() -> None:
    def draws() -> tuple[float, float, torch.Tensor]:
        return random.random(), float(np.random.rand()), torch.rand(2)

    ht.seed_everything(42)
    first = draws()
    ht.seed_everything(42)
    second = draws()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    with pytest.raises(ValueError, match="seed=2\\.5"):
        ht.seed_everything(2.5)  # type: ignore[arg-type]


def test_deterministic_mode_sets_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        ht.seed_everything(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_a_run_dir_that_is_a_file_is_named_by_the_constructor(tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for run_dir in (afile, afile / "run"):
        with pytest.raises(ValueError, match=r"notes\.txt is a file, not a folder"):
            make(run_dir)
    assert afile.read_text() == "x"


def test_restore_loads_the_newest_checkpoint_for_evaluation_and_writes_nothing(
    tmp_path: Path,
) -> None:
    trainer, step = make(tmp_path / "run", policy=ht.CheckpointPolicy(
        every=None, every_steps=4, keep_last=3, async_save=False))
    trainer.fit(step, max_steps=10)
    saved = ht.CheckpointStore(tmp_path / "run").load()
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    evaluator, _ = make(tmp_path / "run")
    info = evaluator.restore()
    assert (info.step, evaluator.step) == (10, 10)
    weights = evaluator.model.state_dict()
    for name, tensor in saved.tensors.items():
        if name.startswith("model/"):
            assert torch.equal(weights[name.removeprefix("model/")], tensor), name
    assert evaluator.restore(step=8).step == 8 and evaluator.step == 8
    after = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    assert after == before  # no file written, none touched
    with pytest.raises(ht.NoCheckpointError):
        make(tmp_path / "empty")[0].restore()
