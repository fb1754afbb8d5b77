"""The only module that talks to torch.distributed.

Everything here degrades to a single process (rank 0 of 1) when torch.distributed is not
initialised, so callers never branch on it themselves.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_and_world_size()[1] > 1


def new_cpu_group() -> Any:
    """Collective: every rank must call this. A gloo group of all ranks, for work on CPU
    tensors from a background thread, apart from the training collectives."""
    return dist.new_group(backend="gloo")


def destroy_group(group: Any) -> None:
    """Collective: every rank must call this. Free a group from ``new_cpu_group``."""
    dist.destroy_process_group(group)


def all_gather_json(obj: Any, group: Any) -> list[Any]:
    """Collective: every rank must call this. Every rank's JSON-able ``obj``, in rank order.

    JSON over uint8 tensors rather than ``all_gather_object``: nothing is unpickled.
    """
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    world_size = dist.get_world_size(group)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    max_size = max(int(s.item()) for s in sizes)
    padded = torch.zeros(max_size, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    gathered = [torch.zeros(max_size, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [
        json.loads(g[: int(s.item())].numpy().tobytes())
        for g, s in zip(gathered, sizes, strict=True)
    ]


def vote_max(values: list[int], group: Any) -> list[int]:
    """Collective: every rank must call this, with as many values (each 0..255). Each
    value becomes its maximum over the ranks: one small all-reduce (MAX) on ``group``.
    A flag is True anywhere if it is True somewhere; a signal number survives the vote."""
    if group is None or not is_distributed():
        return values
    votes = torch.tensor(values, dtype=torch.uint8)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in votes.tolist()]
