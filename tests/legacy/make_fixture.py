"""Write tests/legacy/checkpoint-e5e9604/: a run folder checkpointed by hardtrain at
revision e5e9604, and what that same code computes when it continues the run.

How it was made (from the repository root, with a checkout of e5e9604 at /tmp/before):

    PYTHONPATH=/tmp/before/src .venv/bin/python -m tests.legacy.make_fixture

It needs the code of revision e5e9604 on PYTHONPATH: it refuses to run unless the
imported hardtrain is a git checkout at that revision, without uncommitted changes (the
run.json it writes describes that checkout: commit e5e9604, clean tree).

What it does, with the job in tests/legacy/job.py (default checkpoint, preemption, NaN
and metadata policies; one NaN step at the 3rd attempt, skipped by the NaN policy):

1. trains a fresh run to step SAVED_STEP (6) into checkpoint-e5e9604/run (checkpoints at
   steps 4 and 6, keep_last=2; metrics.jsonl kept, events.jsonl deleted: it holds only
   timings and this machine's paths);
2. continues a copy of that folder to FINAL_STEP (10) with the same code, in a fresh job,
   and records the continuation: the loss of each step 7..10 (metrics.jsonl, JSON
   numbers written with float repr) and the final step, counter, scheduler state and lr
   in expected.json; the final model, optimizer and extra-state tensors in
   expected.safetensors (with each tensor's SHA-256 in expected.json, for reading).

Only the folder at step 6 and expected.* are committed. test_legacy_checkpoint.py resumes
a copy of the folder with the current code and checks it continues exactly the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import hardtrain as ht
from tests.legacy import job
from tests.trainer import compare


def _check_code() -> Path:
    source = Path(ht.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=source,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not head.startswith(job.REVISION) or dirty:
        sys.exit(f"hardtrain is imported from {source} at {head[:7]}"
                 f"{' with uncommitted changes' if dirty else ''}: put a clean checkout of "
                 f"{job.REVISION} first on PYTHONPATH (PYTHONPATH=/tmp/before/src)")
    return source


def main() -> None:
    source = _check_code()
    metadata = ht.MetadataPolicy(repo=source)  # run.json describes the code that wrote it
    if job.FIXTURE.exists():
        shutil.rmtree(job.FIXTURE)
    job.FIXTURE.mkdir(parents=True)

    first = job.build(job.FIXTURE_RUN, metadata=metadata)
    result = first.fit(job.SAVED_STEP)
    assert result.step == job.SAVED_STEP and result.resumed_from is None, result
    os.remove(job.FIXTURE_RUN / "events.jsonl")
    print(f"fixture: {job.FIXTURE_RUN} at step {result.step}, {first.attempts.count} attempts")

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(job.FIXTURE_RUN, copy)
        again = job.build(copy, metadata=metadata)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = again.fit(job.FINAL_STEP)
        assert result.resumed_from == job.SAVED_STEP and result.step == job.FINAL_STEP, result
        for w in seen:
            print(f"continuation warned: {w.category.__name__}: {w.message}")
        losses = compare.losses(copy)
        tensors = again.final_tensors()
        expected = {
            "revision": job.REVISION,
            "saved_step": job.SAVED_STEP,
            "final_step": job.FINAL_STEP,
            "losses": {str(s): losses[s] for s in range(job.SAVED_STEP + 1, job.FINAL_STEP + 1)},
            "fixture_losses": {str(s): losses[s] for s in range(1, job.SAVED_STEP + 1)},
            "final": again.final_scalars(),
            "tensor_sha256": {
                name: hashlib.sha256(t.numpy().tobytes()).hexdigest()
                for name, t in sorted(tensors.items())
            },
            "torch": torch.__version__,
        }
    save_file(tensors, job.EXPECTED_TENSORS, metadata={"revision": job.REVISION})
    job.EXPECTED_JSON.write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(expected["losses"], indent=1))


if __name__ == "__main__":
    main()
