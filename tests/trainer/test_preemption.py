"""SIGTERM to a real training process: it stops at a step, saves within the deadline, exits
143, and the restart equals the uninterrupted run bit for bit.

Each case runs tests/trainer/train_script.py (see its docstring for the faults) with a
signal keyed by step or by stage (during a save, during resume), then again with the same
command, and compares with the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht
from tests.trainer.compare import assert_same_run, run, straight
from tests.trainer.test_trainer import FakeClock, make

SETTINGS = ("--every-steps", "5")
TERM = 128 + signal.SIGTERM


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def committed(run_dir: Path) -> list[int]:
    return [info.step for info in ht.CheckpointStore(run_dir).list()]


def finish_and_compare(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    resumed = run(run_dir, *SETTINGS)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_from=None" not in resumed.stdout
    assert_same_run(straight(tmp_path_factory, SETTINGS), run_dir)


def test_sigterm_in_a_step_saves_that_step_and_exits_143(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stopped = run(tmp_path, *SETTINGS, "--term-at", "11")  # arrives inside step 12
    assert stopped.returncode == TERM, stopped.stderr
    assert "stopped at step 12 on SIGTERM" in stopped.stderr
    assert committed(tmp_path)[-1] == 12
    [preempted] = events(tmp_path, "preempted")
    assert preempted["step"] == 12 and preempted["saved"] is True
    assert preempted["exit_code"] == TERM and preempted["signal"] == "SIGTERM"
    assert preempted["since_signal_s"] < preempted["deadline_s"]
    assert events(tmp_path, "preemption_requested")[0]["signalled_ranks"] == [0]
    finish_and_compare(tmp_path, tmp_path_factory)


def test_sigterm_to_the_process_group_does_not_kill_the_loader_workers_first(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """torchrun and SLURM signal the process group; PyTorch's workers die on SIGTERM and
    would crash the step before the vote (unless fit shields them)."""
    stopped = run(tmp_path, *SETTINGS, "--term-at", "11", "--term-group")
    assert stopped.returncode == TERM, stopped.stderr
    assert "killed by signal" not in stopped.stderr
    assert committed(tmp_path)[-1] == 12
    finish_and_compare(tmp_path, tmp_path_factory)


def test_sigterm_during_an_async_save_abandons_it_and_saves_the_current_step_once(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Earlier saves were quick, so the stop step fits: the state is written once, the
    stop step's, not the rest of the save in flight too."""
    stopped = run(tmp_path, *SETTINGS, "--term-in-save", "9", "--slow-write", "30")
    assert stopped.returncode == TERM, stopped.stderr
    [preempted] = events(tmp_path, "preempted")
    assert preempted["saved"] is True and preempted["step"] > 10
    [abandoned] = events(tmp_path, "checkpoint_save_abandoned")
    assert abandoned["step"] == 10 and "abandoned" in abandoned["error"]
    assert not events(tmp_path, "checkpoint_save_failed")
    assert committed(tmp_path) == [5, preempted["step"]]
    assert preempted["since_signal_s"] < 30  # it did not wait for the slow write
    finish_and_compare(tmp_path, tmp_path_factory)


def test_sigterm_during_the_final_save_exits_with_the_run_complete(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stopped = run(tmp_path, *SETTINGS, "--term-in-save", "29")  # the save of step 30 (last)
    assert stopped.returncode == TERM, stopped.stderr
    assert "done" not in stopped.stdout  # code after fit did not run
    [preempted] = events(tmp_path, "preempted")
    assert preempted["step"] == 30 and preempted["saved"] is True
    assert committed(tmp_path)[-1] == 30
    finish_and_compare(tmp_path, tmp_path_factory)  # returns at once: resumed_from=30


def test_sigterm_during_resume_exits_without_a_new_checkpoint(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert run(tmp_path, *SETTINGS, "--sync", "--kill-at", "11").returncode == -signal.SIGKILL
    stopped = run(tmp_path, *SETTINGS, "--term-in-resume")
    assert stopped.returncode == TERM, stopped.stderr
    [preempted] = events(tmp_path, "preempted")
    assert preempted["step"] == 10 and preempted["saved"] is True
    assert committed(tmp_path)[-1] == 10
    finish_and_compare(tmp_path, tmp_path_factory)


def test_a_second_sigterm_while_saving_changes_nothing(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stopped = run(tmp_path, *SETTINGS, "--term-at", "11", "--term-twice")
    assert stopped.returncode == TERM, stopped.stderr
    assert committed(tmp_path)[-1] == 12
    assert events(tmp_path, "preempted")[0]["num_signals"] == 2
    report = ht.CheckpointStore(tmp_path).verify(12)
    assert report.ok, report
    finish_and_compare(tmp_path, tmp_path_factory)


# ------------------------------------------------------------------------- in one process


def signal_self(trainer: ht.HardenedTrainer, at_step: int, sig: int = signal.SIGTERM,
                step: Any = None) -> Any:
    """A step_fn that sends ``sig`` to this process inside step at_step + 1."""

    def step_fn(batch: Any) -> Any:
        if trainer.step == at_step:
            os.kill(os.getpid(), sig)
        return step(batch)

    return step_fn


def test_handlers_are_installed_by_fit_only_and_restored(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trainer, step = make(tmp_path)
    seen: list[Any] = []

    def step_fn(batch: Any) -> Any:
        seen.append(signal.getsignal(signal.SIGTERM))
        return step(batch)

    assert {s: signal.getsignal(s) for s in before} == before  # the constructor installs none
    trainer.fit(step_fn, max_steps=2)
    assert seen[0] not in (before[signal.SIGTERM], signal.SIG_DFL)
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(TypeError):  # restored on an error too
        trainer.fit(lambda batch: 1.0, max_steps=4)
    assert {s: signal.getsignal(s) for s in before} == before


def test_preemption_none_leaves_the_handlers_alone(tmp_path: Path) -> None:
    trainer, step = make(tmp_path, preemption=None)
    seen: list[Any] = []
    trainer.fit(lambda batch: seen.append(signal.getsignal(signal.SIGTERM)) or step(batch),
                max_steps=1)
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_sigusr1_with_a_custom_exit_code_and_not_an_exception(tmp_path: Path) -> None:
    trainer, step = make(tmp_path, preemption=ht.PreemptionPolicy(exit_code=75))
    with pytest.raises(ht.Preempted) as raised:
        try:
            trainer.fit(signal_self(trainer, 6, signal.SIGUSR1, step), max_steps=20)
        except Exception:  # what user code often has around fit: it must not catch this
            pytest.fail("Preempted was caught as an Exception")
    assert raised.value.code == 75 and raised.value.step == 7 and raised.value.saved
    assert raised.value.signal == "SIGUSR1"
    assert raised.value.checkpoint.step == 7
    assert "runbooks/preemption.md" in str(raised.value)
    again, step = make(tmp_path)
    assert again.fit(step, max_steps=20).resumed_from == 7


def test_default_exit_code_is_128_plus_the_signal(tmp_path: Path) -> None:
    trainer, step = make(tmp_path)
    with pytest.raises(ht.Preempted) as raised:
        trainer.fit(signal_self(trainer, 2, signal.SIGUSR1, step), max_steps=20)
    assert raised.value.code == 128 + signal.SIGUSR1


def test_without_checkpoints_it_still_stops_at_a_step(tmp_path: Path) -> None:
    trainer, step = make(tmp_path, policy=None)
    trainer.checkpoint = None
    with pytest.raises(ht.Preempted) as raised:
        trainer.fit(signal_self(trainer, 3, step=step), max_steps=20)
    assert raised.value.step == 4 and not raised.value.saved and raised.value.checkpoint is None


def test_a_save_that_earlier_saves_say_will_not_fit_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hardtrain.checkpoint import _storage

    write = _storage.LocalStorage.write_tensors

    def slow_write(self: Any, path: str, tensors: Any, check: Any) -> Any:
        time.sleep(0.3)  # slow storage
        return write(self, path, tensors, check)

    monkeypatch.setattr(_storage.LocalStorage, "write_tensors", slow_write)
    clock = FakeClock()  # stands still: the deadline never passes, only the estimate decides
    trainer, step = make(tmp_path, clock=clock,
                         preemption=ht.PreemptionPolicy(deadline=0.2))
    with pytest.raises(ht.Preempted) as raised:
        trainer.fit(signal_self(trainer, 5, step=step), max_steps=20)
    assert not raised.value.saved and raised.value.checkpoint.step == 4
    records = [e for e in trainer_events(tmp_path) if e["event"] == "preemption_save_skipped"]
    assert "earlier saves took up to" in records[0]["reason"]


@pytest.mark.parametrize("in_flight_s", [0.2, 30.0])
def test_when_a_new_save_would_not_fit_the_save_in_flight_is_finished_or_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_flight_s: float
) -> None:
    """The save of step 4 took 1 s, so a new one will not fit a 0.9 s budget: the save of
    step 8, in flight at the stop after step 9, is finished when it takes 0.2 s more (the
    run stops at step 8), abandoned at the deadline when it takes 30 s (it stops at 4)."""
    from hardtrain.checkpoint import _storage

    write = _storage.LocalStorage.write_tensors
    stopping = threading.Event()

    def scripted_write(self: Any, path: str, tensors: Any, check: Any) -> Any:
        if "step-00000004" in path:
            time.sleep(1.0)  # slow storage: what the estimate learns
        elif "step-00000008" in path:
            assert stopping.wait(timeout=60)
            end = time.monotonic() + in_flight_s
            while time.monotonic() < end:  # slow storage, written in pieces
                check()
                time.sleep(0.005)
        return write(self, path, tensors, check)

    monkeypatch.setattr(_storage.LocalStorage, "write_tensors", scripted_write)
    trainer, step = make(tmp_path, clock=FakeClock(),  # stands still: the budget is 0.9 s
                         policy=ht.CheckpointPolicy(every=None, every_steps=4),
                         preemption=ht.PreemptionPolicy(deadline=1.0))

    def step_fn(batch: Any) -> Any:
        if trainer.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)
            stopping.set()
        return step(batch)

    with pytest.raises(ht.Preempted) as raised:
        trainer.fit(step_fn, max_steps=20)
    stopped_at = 8 if in_flight_s < 1 else 4
    assert raised.value.step == 9 and not raised.value.saved
    assert raised.value.checkpoint.step == stopped_at
    assert committed(tmp_path) == [4, 8][: stopped_at // 4]
    names = [e["event"] for e in trainer_events(tmp_path)]
    assert ("checkpoint_save_abandoned" in names) == (stopped_at == 4)
    [skipped] = [e for e in trainer_events(tmp_path) if e["event"] == "preemption_save_skipped"]
    assert "earlier saves took up to" in skipped["reason"]
    assert skipped["checkpoint_step"] == stopped_at


def test_fit_outside_the_main_thread_says_it_cannot_catch_signals(tmp_path: Path) -> None:
    trainer, step = make(tmp_path)
    results: list[ht.FitResult] = []
    thread = threading.Thread(target=lambda: results.append(trainer.fit(step, max_steps=3)))
    thread.start()
    thread.join(timeout=120)
    assert results and results[0].step == 3
    assert any(e["event"] == "preemption_unarmed" for e in trainer_events(tmp_path))


def trainer_events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"signals": ()}, "signals=()"),
    ({"signals": (signal.SIGKILL,)}, "SIGKILL cannot be caught"),
    ({"signals": ("SIGNOPE",)}, "'SIGNOPE' is not a signal name"),
    ({"deadline": 0}, "deadline=0"),
    ({"deadline": "-5s"}, "deadline='-5s'"),
    ({"deadline": "soon"}, "deadline='soon'"),
    ({"exit_code": 0}, "exit_code=0"),
    ({"exit_code": 256}, "exit_code=256"),
    ({"exit_code": True}, "exit_code=True"),
])
def test_invalid_preemption_policy_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ht.PreemptionPolicy(**kwargs)


def test_preemption_policy_accepts_names_numbers_and_durations() -> None:
    policy = ht.PreemptionPolicy(signals=("term", "SIGUSR2", 10), deadline="1min")
    assert policy.signals == (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1)
    assert policy.deadline_s == 60.0 and policy.exit_code_for(signal.SIGTERM) == 143
    with pytest.raises(TypeError, match="preemption="):
        make("unused", preemption="on")


def test_the_guard_works_alone() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    with ht.PreemptionGuard(ht.PreemptionPolicy(signals=("SIGUSR2",))) as guard:
        assert guard.armed and not guard.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.requested and guard.num_received == 2
        assert guard.exit_code == 128 + signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == before


_worker_inits: list[int] = []


class SignalReport(torch.utils.data.Dataset[torch.Tensor]):
    """Each item says how SIGTERM is handled in the process that loads it, and whether
    the user's worker_init_fn ran there."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        ignored = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return torch.tensor([float(ignored), float(blocked), float(bool(_worker_inits))])


def test_loader_workers_ignore_the_signals_and_the_users_init_still_runs(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(SignalReport(), batch_size=2, num_workers=2,
                                         worker_init_fn=_worker_inits.append)
    policy = ht.PreemptionPolicy()
    from hardtrain.preemption import shield_loader_workers

    with shield_loader_workers(loader, policy) as taking_batch:
        with taking_batch:
            batches = list(loader)
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert loader.worker_init_fn == _worker_inits.append  # the user's, put back
    # in the workers: ignored, not blocked, and the user's worker_init_fn ran
    assert torch.equal(torch.cat(batches), torch.tensor([[1.0, 0.0, 1.0]] * 4))
    assert [float(x) for x in torch.cat(list(loader))[:, 0]] == [0.0] * 4  # outside: default


def test_a_process_forked_while_taking_a_batch_starts_with_the_signals_blocked() -> None:
    from hardtrain.preemption import _Blocked

    with _Blocked((signal.SIGTERM,)):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
