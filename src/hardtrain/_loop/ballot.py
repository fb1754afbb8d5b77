"""The per-step vote: every feature's slots in one integer tensor, one all-reduce.

Each feature owns named slots (``Feature.slots``); the ballot lays them out once, in the
trainer's table order, in one preallocated int64 tensor. ``cast`` asks each voting
feature for its values (local, no sync), writes them in place, reduces the tensor with
MAX over the ranks in ONE all-reduce on the control group, and reads the verdict off it.
A ``minimum`` slot carries ``-x``, so the same MAX gives its minimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hardtrain import _dist
from hardtrain._loop.protocol import Effect, Feature, Slot, StepReport, Verdict, overrides


class Ballot:
    """The slots of ``features`` in one tensor; ``cast`` is collective (one all-reduce)."""

    def __init__(self, features: Sequence[Feature], group: Any) -> None:
        slots: list[Slot] = []
        self._voters: list[tuple[Feature, int, int]] = []  # (feature, offset, count)
        for feature in features:
            if feature.slots and overrides(feature, "vote"):
                self._voters.append((feature, len(slots), len(feature.slots)))
                slots.extend(feature.slots)
        names = [s.name for s in slots]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"ballot slots {duplicated} are claimed by more than one feature")
        self.slots = tuple(slots)
        self._group = group
        self._tensor = torch.zeros(len(slots), dtype=torch.int64)  # allocated once
        self._values = self._tensor.numpy()  # the same memory: writes need no torch call
        self._votes = [0] * len(slots)  # this rank's votes, filled in place
        self._index = {s.name: i for i, s in enumerate(slots)}
        self._negate = [i for i, s in enumerate(slots) if s.minimum]
        self._skip = [i for i, s in enumerate(slots) if s.effect is Effect.SKIP]
        self._save = [i for i, s in enumerate(slots) if s.effect is Effect.SAVE]
        self._stop = [(i, s.name) for i, s in enumerate(slots) if s.effect is Effect.STOP]

    def cast(self, report: StepReport | None) -> Verdict:
        """Collective when distributed: every rank must call this at the same point.
        Each feature's vote, then one all-reduce (MAX) of the whole ballot."""
        votes = self._votes
        for feature, offset, count in self._voters:
            mine = feature.vote(report)
            if len(mine) != count:
                raise ValueError(f"{feature.name}.vote gave {len(mine)} values for its "
                                 f"{count} slots")
            votes[offset:offset + count] = mine
        for i in self._negate:
            votes[i] = -votes[i]
        if self._group is not None:
            self._values[:] = votes
            _dist.all_reduce_max(self._tensor, self._group)
            reduced = self._values.tolist()
        else:
            reduced = votes[:]
        for i in self._negate:
            reduced[i] = -reduced[i]
        stop = None
        for i, name in self._stop:
            if reduced[i]:
                stop = name
                break
        skip = save = False
        for i in self._skip:
            skip = skip or bool(reduced[i])
        for i in self._save:
            save = save or bool(reduced[i])
        return Verdict(skip, save, stop, reduced, self._index)
