"""The only module that talks to torch.distributed, and the one owner of its groups.

Everything here degrades to a single process (rank 0 of 1) when torch.distributed is not
initialised, so callers never branch on it themselves.

``groups`` hands out the gloo groups hardtrain works on, one per role ("control" for the
trainer's vote and agreements, "checkpoint:<n>" for the n-th store's commits): the default
group may be NCCL, which needs GPU tensors, and a store's background thread must not
share a group with the main thread's collectives. No other module creates or destroys a
group.
"""

from __future__ import annotations

import atexit
import json
from typing import Any

import torch
import torch.distributed as dist

CONTROL = "control"  # the trainer's group: the per-step vote and what follows it


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_and_world_size()[1] > 1


class ProcessGroups:
    """Creates, hands out, rebuilds and destroys every group hardtrain uses.

    ``get(role)`` is collective the first time a role is asked for in a generation (every
    rank must ask for it at the same point); after that it is a dictionary lookup.
    ``rebuild()`` destroys them all and starts a new generation, whose groups are created
    afresh on first use: each ``new_group`` gets a new name, and so a store prefix no
    earlier group used (the seam collective-timeout recovery needs). A new default group
    (``destroy_process_group`` and ``init_process_group`` again) drops the old groups.

    The groups are let go at interpreter exit (``atexit``, registered with the first
    group): a gloo group still referenced when the interpreter tears its modules down can
    abort the process ("terminate called without an active exception").
    """

    def __init__(self) -> None:
        self.generation = 0
        self._groups: dict[str, Any] = {}
        self._world: Any = None  # the default group the cached groups belong to
        self._released_at_exit = False

    def get(self, role: str) -> Any | None:
        """The gloo group of all ranks for ``role``; None with a single process.
        Collective on first use in a generation: every rank must call it."""
        if not is_distributed():
            return None
        world = dist.group.WORLD
        if world is not self._world:
            self._groups.clear()
            self._world = world
        group = self._groups.get(role)
        if group is None:
            group = dist.new_group(backend="gloo",
                                   group_desc=f"hardtrain/{self.generation}/{role}")
            self._groups[role] = group
            if not self._released_at_exit:
                atexit.register(self._let_go)
                self._released_at_exit = True
        return group

    def _let_go(self) -> None:
        """Drop every reference (no collective: the other ranks may be gone)."""
        self._groups.clear()
        self._world = None

    def rebuild(self) -> None:
        """Collective: every rank must call this. Destroy every group and start a new
        generation; the next ``get`` of each role creates it again."""
        self.destroy()
        self.generation += 1

    def destroy(self) -> None:
        """Collective: every rank must call this. Free every group handed out."""
        groups, self._groups = self._groups, {}
        if dist.is_available() and dist.is_initialized() and self._world is dist.group.WORLD:
            for group in groups.values():
                dist.destroy_process_group(group)


groups = ProcessGroups()  # this process's one owner; creating it touches nothing


def all_gather_json(obj: Any, group: Any) -> list[Any]:
    """Collective: every rank must call this. Every rank's JSON-able ``obj``, in rank order
    (``[obj]`` when ``group`` is None: a single process).

    JSON over uint8 tensors rather than ``all_gather_object``: nothing is unpickled.
    """
    if group is None:
        return [obj]
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


def all_reduce_max(values: torch.Tensor, group: Any) -> None:
    """Collective: every rank must call this. ``values`` (an integer CPU tensor) becomes
    its element-wise maximum over the ranks, in place: one all-reduce on ``group``.
    Nothing happens when ``group`` is None (a single process)."""
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)


def agree(flag: bool, group: Any) -> bool:
    """Collective: every rank must call this. True on every rank if ``flag`` is True on
    any; also a meeting point (no rank leaves before every rank arrived)."""
    if group is None:
        return flag
    votes = torch.tensor([int(flag)], dtype=torch.uint8)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return bool(votes.item())
