"""The trainer writes run.json into every checkpoint, keeps secrets off the disk, and
compares the environment on resume."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import hardtrain as ht
from tests.gitrepo import git, new_repo

SECRETS = {
    "HF_TOKEN": "hf_" + "Qw3Er5Ty7U" * 4,
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "MY_SERVICE_PASSWORD": "correct-horse-battery",
}
CONFIG_SECRET = "cfg-secret-value-42"


def make(run_dir: Path, config: Any = None, **kwargs: Any) -> tuple[ht.HardenedTrainer, Any]:
    ht.seed_everything(0)
    # git state of a folder outside any repository, not of this checkout (edited meanwhile)
    kwargs.setdefault("metadata", ht.MetadataPolicy(repo=run_dir.parent))
    model = torch.nn.Linear(4, 1)
    data = [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    trainer = ht.HardenedTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data, run_dir, config=config,
        checkpoint=ht.CheckpointPolicy(every=None, every_steps=2, keep_last=None), **kwargs)
    return trainer, lambda batch: model(batch).square().sum()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return new_repo(tmp_path / "repo")


def test_every_checkpoint_holds_the_run_metadata(tmp_path: Path, repo: Path) -> None:
    (repo / "train.py").write_text("lr = 0.2\n")  # uncommitted
    config = {"lr": 0.1, "layers": [4, 1]}
    trainer, step_fn = make(tmp_path / "run", config, seed=5,
                            metadata=ht.MetadataPolicy(repo=repo))
    trainer.fit(step_fn, max_steps=4)
    store = ht.CheckpointStore(tmp_path / "run")
    for step in (2, 4):
        meta = json.loads(store.read_file(step, "run.json"))
        assert meta["config"] == config and meta["determinism"]["seed"] == 5
        assert meta["git"]["commit"] == git(repo, "rev-parse", "HEAD")
        assert meta["git"]["dirty"] is True and meta["git"]["diff_file"] == "git-diff.patch"
        assert "+lr = 0.2" in store.read_file(step, "git-diff.patch").decode()
        assert meta["world"]["world_size"] == 1
        assert store.verify(step).ok
    manifest = json.loads((tmp_path / "run/checkpoints/step-00000004/MANIFEST.json").read_text())
    assert {"run.json", "git-diff.patch"} <= set(manifest["files"])


def test_secrets_are_nowhere_under_the_run_dir(tmp_path: Path, repo: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["train.py", "--wandb-api-key", "argv-secret-value",
                                      "--db-password=correcthorsebatterystaple"])
    # secrets pasted into the code and a YAML file, uncommitted: they would be in the diff
    (repo / "train.py").write_text(f"password = '{SECRETS['MY_SERVICE_PASSWORD']}'\n")
    (repo / "conf.yaml").write_text("lr: 0.1\n")
    git(repo, "add", "conf.yaml")
    git(repo, "commit", "-q", "-m", "conf")
    (repo / "conf.yaml").write_text("lr: 0.1\nadmin_password: letmeinplease\n")
    config = {"lr": 0.1, "hub": {"token": CONFIG_SECRET},
              "bucket": f"s3://AKIAIOSFODNN7EXAMPLE:{SECRETS['AWS_SECRET_ACCESS_KEY']}@b/x"}
    run_dir = tmp_path / "run"
    trainer, step_fn = make(run_dir, config, metadata=ht.MetadataPolicy(repo=repo))
    trainer.fit(step_fn, max_steps=4)
    trainer, step_fn = make(run_dir, config, metadata=ht.MetadataPolicy(repo=repo))
    trainer.fit(step_fn, max_steps=6)  # a resume: its events and checkpoints too
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "git-diff.patch", "events.jsonl",
                                       "metrics.jsonl"}
    for path in files:
        data = path.read_bytes()
        for secret in [*SECRETS.values(), CONFIG_SECRET, "argv-secret-value",
                       "AKIAIOSFODNN7EXAMPLE", "correcthorsebatterystaple", "letmeinplease"]:
            assert secret.encode() not in data, (path, secret)


def test_a_changed_version_on_resume_warns(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    trainer, step_fn = make(tmp_path / "run")
    trainer.fit(step_fn, max_steps=4)
    old_torch = torch.__version__
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    trainer, step_fn = make(tmp_path / "run")
    with pytest.warns(ht.EnvironmentChangedWarning) as caught:
        result = trainer.fit(step_fn, max_steps=6)
    assert result.resumed_from == 4 and result.step == 6
    message = str(caught[0].message)
    assert f'versions.torch: "{old_torch}" -> "9.9.9"' in message
    assert 'env.NCCL_ALGO: null -> "Tree"' in message
    assert "runbooks/environment-changed.md" in message
    events = [json.loads(line) for line in (tmp_path / "run/events.jsonl").open()]
    changed = [e for e in events if e["event"] == "environment_changed"]
    assert len(changed) == 1
    assert {"field": "versions.torch", "old": old_torch, "new": "9.9.9",
            "breaks_exactness": True} in changed[0]["changes"]
    # the checkpoints written after the resume carry the new environment
    meta = json.loads(ht.CheckpointStore(tmp_path / "run").read_file(6, "run.json"))
    assert meta["versions"]["torch"] == "9.9.9"


def test_refuse_policy_loads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, step_fn = make(tmp_path / "run", {"lr": 0.1})
    trainer.fit(step_fn, max_steps=4)
    before = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    trainer, step_fn = make(tmp_path / "run", {"lr": 0.5},
                            metadata=ht.MetadataPolicy(on_change="refuse"))
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ht.EnvironmentChangedError, match=r"config\.lr: 0\.1 -> 0\.5") as raised:
        trainer.fit(step_fn, max_steps=6)
    assert isinstance(raised.value, ht.CheckpointMismatchError)
    assert [c.field for c in raised.value.changes] == ["config.lr"]
    assert "runbooks/environment-changed.md" in str(raised.value)
    assert trainer.step == 0
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, fresh[key])
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == before


def test_same_environment_resumes_quietly(tmp_path: Path) -> None:
    trainer, step_fn = make(tmp_path / "run", {"lr": 0.1}, seed=1, deterministic=True)
    trainer.fit(step_fn, max_steps=4)
    trainer, step_fn = make(tmp_path / "run", {"lr": 0.1}, seed=1, deterministic=True,
                            metadata=ht.MetadataPolicy(on_change="refuse"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.fit(step_fn, max_steps=6).resumed_from == 4
    torch.use_deterministic_algorithms(False)


def test_metadata_none_writes_no_run_json(tmp_path: Path) -> None:
    trainer, step_fn = make(tmp_path / "run", metadata=None)
    trainer.fit(step_fn, max_steps=2)
    assert not list((tmp_path / "run").rglob("run.json"))
    with pytest.raises(FileNotFoundError, match=r"holds no run\.json"):
        ht.CheckpointStore(tmp_path / "run").read_file(2, "run.json")
    # resuming such a run with metadata on: nothing to compare. "refuse" will not vouch
    # for an unknown environment; "warn" goes on, and an event says so
    trainer, step_fn = make(tmp_path / "run", metadata=ht.MetadataPolicy(on_change="refuse"))
    with pytest.raises(ht.EnvironmentChangedError, match=r"has no run\.json"):
        trainer.fit(step_fn, max_steps=4)
    trainer, step_fn = make(tmp_path / "run")
    assert trainer.fit(step_fn, max_steps=4).resumed_from == 2
    events = [json.loads(line) for line in (tmp_path / "run/events.jsonl").open()]
    assert [e["step"] for e in events if e["event"] == "metadata_missing"] == [2, 2]
    assert ht.CheckpointStore(tmp_path / "run").read_file(4, "run.json")


def test_without_checkpoints_it_trains_and_writes_no_metadata(tmp_path: Path) -> None:
    trainer, step_fn = make(tmp_path / "run", metadata=ht.MetadataPolicy(on_change="refuse"))
    trainer.checkpoint = None
    trainer.fit(step_fn, max_steps=2)
    assert not list((tmp_path / "run").rglob("run.json"))


def test_cli_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    from hardtrain.cli import main

    assert main(["metadata"]) == 0
    now = json.loads(capsys.readouterr().out)
    assert now["versions"]["torch"] == torch.__version__ and "diff" not in now["git"]

    trainer, step_fn = make(tmp_path / "run", {"lr": 0.1}, seed=1, deterministic=True)
    trainer.fit(step_fn, max_steps=2)
    torch.use_deterministic_algorithms(False)
    assert main(["metadata", str(tmp_path / "run")]) == 0  # config, seed, flags: not compared
    out = capsys.readouterr().out
    assert "step 2 of" in out and "breaks bit-exactness" not in out

    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert main(["metadata", str(tmp_path / "run"), "--step", "2"]) == 1
    out = capsys.readouterr().out
    assert "breaks bit-exactness:" in out and '-> "9.9.9"' in out
    assert "runbooks/environment-changed.md" in out
    assert main(["metadata", str(tmp_path / "run"), "--json"]) == 1
    changes = json.loads(capsys.readouterr().out)
    assert {"field": "versions.torch", "new": "9.9.9"}.items() <= changes[0].items()

    assert main(["metadata", str(tmp_path / "run"), "--step", "7"]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err
