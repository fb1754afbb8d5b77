"""Checkpoints written by an earlier hardtrain load, and the run goes on exactly as that
earlier code would have continued it.

checkpoint-e5e9604/run was written by revision e5e9604 (see make_fixture.py, which also
recorded how that code continues the run, in expected.json and expected.safetensors). The
current code resumes a copy of it and must reproduce that continuation bit for bit.

The fixture's run.json describes another machine and another commit, so the environment
check on resume may warn (EnvironmentChangedWarning); it is allowed: this test is about
loading the checkpoint, not about the environment check.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

import hardtrain as ht
from tests.legacy import job
from tests.trainer import compare


def test_checkpoint_from_e5e9604_resumes_exactly(tmp_path: Path) -> None:
    expected = json.loads(job.EXPECTED_JSON.read_text(encoding="utf-8"))
    expected_tensors = load_file(job.EXPECTED_TENSORS)
    assert expected["saved_step"] == job.SAVED_STEP and expected["final_step"] == job.FINAL_STEP
    run_dir = tmp_path / "run"
    shutil.copytree(job.FIXTURE_RUN, run_dir)

    resumed = job.build(run_dir, metadata=ht.MetadataPolicy(on_change="warn"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = resumed.fit(job.FINAL_STEP)
    unexpected = [f"{w.category.__name__}: {w.message}" for w in seen
                  if issubclass(w.category, ht.CheckpointFallbackWarning)]
    assert not unexpected, unexpected  # the newest checkpoint loaded, not an older one

    assert result.resumed_from == job.SAVED_STEP, result
    assert result.step == job.FINAL_STEP, result
    assert result.num_steps == job.FINAL_STEP - job.SAVED_STEP, result

    losses = compare.losses(run_dir)
    for step in range(job.SAVED_STEP + 1, job.FINAL_STEP + 1):
        want = expected["losses"][str(step)]
        assert losses.get(step) == want, f"step {step}: loss {losses.get(step)!r} != {want!r}"
    assert max(losses) == job.FINAL_STEP, sorted(losses)

    tensors = resumed.final_tensors()
    assert sorted(tensors) == sorted(expected_tensors)
    for name, want in expected_tensors.items():
        got = tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name} differs from what e5e9604 computed"
    assert resumed.final_scalars() == expected["final"]
