"""Saves checkpoints in a loop until killed; resumes from the newest one on start.

    python saver.py ROOT

Prints "ready <step>" once it has resumed (or started fresh) and is about to save.
Exits 3 if the checkpoint it resumed from is not exactly what was saved for that step.
"""

from __future__ import annotations

import sys

import torch

import hardtrain as ht


def expected(step: int) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    g = torch.Generator().manual_seed(step)
    tensors = {
        "big": torch.randn(512 * 1024, generator=g),
        "mid": torch.randn(300, 100, generator=g).to(torch.bfloat16),
        "small": torch.randint(0, 1000, (17,), generator=g),
        "step": torch.tensor(step),
    }
    return tensors, {"step": step, "tag": f"s{step}", "losses": [step / 3, -step]}


def main() -> int:
    store = ht.CheckpointStore(sys.argv[1], keep_last=3)
    try:
        loaded = store.load()
    except ht.NoCheckpointError:
        step = 0
    else:
        step = loaded.step
        tensors, state = expected(step)
        if loaded.state != state or any(
            not torch.equal(loaded.tensors[k], v) for k, v in tensors.items()
        ):
            print(f"step {step} did not load back as saved", flush=True)
            return 3
    print(f"ready {step}", flush=True)
    while True:
        step += 1
        if step % 2:
            store.save_async(step, *expected(step))
        else:
            store.save(step, *expected(step))


if __name__ == "__main__":
    sys.exit(main())
