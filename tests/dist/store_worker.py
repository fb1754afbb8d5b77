"""One rank of the two-rank checkpoint store scenarios (run under torchrun, gloo).

    torchrun --standalone --nproc_per_node=2 store_worker.py ROOT RESULTS_DIR

Each rank writes what it saw to RESULTS_DIR/rank<R>.json for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import hardtrain as ht


def attempt(fn: Any) -> str:
    """What the call raised, on this rank (errors must come from the same call everywhere)."""
    try:
        fn()
    except ht.CheckpointWriteError as e:
        return f"CheckpointWriteError: {e}"
    return "ok"


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root, results_dir = Path(sys.argv[1]), Path(sys.argv[2])
    store = ht.CheckpointStore(root)
    seen: dict[str, Any] = {}

    def w(value: float) -> dict[str, torch.Tensor]:
        return {"w": torch.full((4,), value)}

    # Cross-rank commit, sync and async.
    store.save(1, w(rank), {"rank": rank})
    store.save_async(2, w(10 + rank), {"rank": rank})
    store.wait()
    loaded = store.load()
    seen["load"] = [loaded.step, loaded.tensors["w"].tolist(), loaded.state]

    # Rank 1's write fails in the background thread: nobody commits, every rank hears it.
    if rank == 1:
        (root / "checkpoints" / "step-00000003" / "rank-00001.safetensors").mkdir(parents=True)
    dist.barrier()
    seen["write_fails"] = attempt(lambda: store.save(3, w(30 + rank)))

    # Rank 1's input is bad (a sparse tensor): it votes "no" before writing anything.
    bad = {"w": torch.eye(4).to_sparse()} if rank == 1 else w(40)
    seen["input_fails"] = attempt(lambda: store.save(4, bad))
    seen["input_fails_async"] = attempt(lambda: (store.save_async(5, bad), store.wait()))

    # The ranks disagree on the step: nobody writes, every rank hears it at the same call.
    seen["different_steps"] = attempt(lambda: store.save_async(7 if rank == 0 else 6, w(70)))

    # The store still works afterwards.
    store.save(6, w(60 + rank), {"rank": rank})
    seen["after_failures"] = store.load().step

    # Storage trouble on one rank while loading (not damage): every rank raises, no hang.
    real_stat = os.stat

    def stale_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if "MANIFEST" in str(path):
            raise OSError(116, "Stale file handle")
        return real_stat(path, *args, **kwargs)

    if rank == 1:
        os.stat = stale_stat  # type: ignore[assignment]
    try:
        ht.CheckpointStore(root).load()
        seen["load_error"] = "ok"
    except ht.CheckpointError as e:
        seen["load_error"] = f"{type(e).__name__}: {e}"
    os.stat = real_stat  # type: ignore[assignment]

    # Rank 1's file of step 6 rots: both ranks fall back to step 2 together.
    if rank == 1:
        path = root / "checkpoints" / "step-00000006" / "rank-00001.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = ht.CheckpointStore(root).load()
    seen["fallback"] = [fallback.step, fallback.tensors["w"].tolist(), fallback.state]
    seen["fallback_warnings"] = [str(c.message) for c in caught]
    seen["committed"] = [i.step for i in store.list()]
    (results_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
