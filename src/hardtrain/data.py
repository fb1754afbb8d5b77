"""Where the trainer is in the data, so that a restart continues with the next batch.

Four kinds of data source:

- stateful: anything with ``state_dict()``/``load_state_dict()`` (torchdata's
  ``StatefulDataLoader``, a user's own loader). Its own state is saved and restored.
- a ``torch.utils.data.DataLoader`` over a map-style dataset: the epoch, the number of
  batches taken from it, and the RNG state at the moment the epoch's iterator was created
  are saved. On resume the epoch's iterator is created again from that RNG state (so a
  shuffled sampler draws the same order) through a copy of the loader whose batch sampler
  skips the batches already used: their indices are drawn, their samples are not loaded.
  A loader with ``persistent_workers=True`` draws its workers' base seed from the run's
  generator only when its first iterator is made; a restarted process makes a new
  iterator, so hardtrain has it draw that seed from a throwaway generator instead, and
  the run's streams advance exactly as in an uninterrupted run.
- a sequence (a list or tuple of batches): the epoch and the count; a restart skips the
  batches already used by index.
- anything else iterable: the epoch and the count are kept, but the position cannot be
  restored; the trainer warns and starts the iterable again.

When the iterable is exhausted, the next epoch starts: ``set_epoch(epoch)`` is called on
the data, its sampler and its batch sampler's sampler, where they have it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

STATEFUL, LOADER, SEQUENCE, ITERABLE = "stateful", "loader", "sequence", "iterable"


def kind_of(data: Iterable[Any]) -> str:
    if all(callable(getattr(data, m, None)) for m in ("state_dict", "load_state_dict")):
        return STATEFUL
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        return LOADER
    if isinstance(data, Sequence):
        return SEQUENCE
    return ITERABLE


def generators_of(data: Iterable[Any]) -> dict[str, torch.Generator]:
    """The torch generators a data loader and its samplers draw from, by role."""
    found: dict[str, torch.Generator] = {}
    candidates = {
        "data": data,
        "sampler": getattr(data, "sampler", None),
        "batch_sampler.sampler": getattr(getattr(data, "batch_sampler", None), "sampler", None),
    }
    seen: set[int] = set()
    for role, obj in candidates.items():
        generator = getattr(obj, "generator", None)
        if isinstance(generator, torch.Generator) and id(generator) not in seen:
            seen.add(id(generator))
            found[role] = generator
    return found


class DataCursor:
    """Hands out batches across epochs and knows how to get back to the same place.

    ``position()`` and ``restore()`` use JSON-able state plus RNG trees made by the
    caller's ``capture_rng``/``restore_rng`` (passed in, so this module stays small).
    """

    def __init__(
        self,
        data: Iterable[Any],
        capture_rng: Callable[[], dict[str, Any]],
        restore_rng: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self.data = data
        self.kind = kind_of(data)
        self.epoch = 0
        self.batches_in_epoch = 0
        self._capture_rng = capture_rng
        self._restore_rng = restore_rng
        self._iterator: Iterator[Any] | None = None
        self._epoch_start_rng: dict[str, Any] | None = None
        self._base_seed_drawn = False  # a persistent loader has drawn its workers' base seed
        self._epoch_draws_base = True  # this epoch's iterator drew it from the run's streams
        self.skip: set[tuple[int, int]] = set()  # (epoch, index in epoch): left out

    @property
    def next_id(self) -> tuple[int, int]:
        """(epoch, index in the epoch) of the next batch, if the epoch has one more."""
        return self.epoch, self.batches_in_epoch

    def next_batch(self) -> Any:
        """The next batch, across epochs; batches in ``skip`` are taken and dropped."""
        batch = self._take()
        while self.skip and (self.epoch, self.batches_in_epoch - 1) in self.skip:
            batch = self._take()
        return batch

    def _take(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        batch = next(self._iterator, _END)  # type: ignore[arg-type]
        if batch is _END:  # the data ran out: the next epoch
            self.epoch += 1
            self.batches_in_epoch = 0
            self._start_epoch()
            batch = next(self._iterator, _END)  # type: ignore[arg-type]
            if batch is _END:
                raise ValueError(
                    f"the data gave no batch in epoch {self.epoch}: an exhausted iterator or an "
                    "empty dataset. Pass something that can be iterated again for each epoch "
                    "(a DataLoader, a list, a re-iterable dataset)."
                )
        self.batches_in_epoch += 1
        return batch

    def release(self) -> None:
        """Drop the iterator (and its worker processes); ``restore`` or the next batch
        creates a new one."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and getattr(self.data, "_iterator", None) is iterator:
            self.data._iterator = None  # type: ignore[attr-defined]  # persistent: not reused
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()

    def _start_epoch(self) -> None:
        _set_epoch(self.data, self.epoch)
        if self.kind != LOADER:
            self._iterator = iter(self.data)
            return
        loader = self.data
        assert isinstance(loader, DataLoader)
        self._epoch_start_rng = self._capture_rng()
        self._epoch_draws_base = not (loader.persistent_workers and self._base_seed_drawn)
        # a live persistent iterator is reused and draws nothing; a new one must not draw
        quiet = not self._epoch_draws_base and getattr(loader, "_iterator", None) is None
        with _base_seed_aside(loader) if quiet else contextlib.nullcontext():
            self._iterator = iter(loader)
        self._base_seed_drawn = self._base_seed_drawn or loader.persistent_workers

    def position(self) -> dict[str, Any]:
        """Collective-free; the data's own state is included for a stateful source."""
        position: dict[str, Any] = {
            "kind": self.kind, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
            "started": self._iterator is not None,
            "skip": sorted([e, i] for e, i in self.skip),
        }
        if self.kind == STATEFUL:
            position["state"] = self.data.state_dict()  # type: ignore[attr-defined]
        if self.kind == LOADER:
            position["base_seed_drawn"] = self._base_seed_drawn
            if self._iterator is not None:
                position["epoch_start_rng"] = self._epoch_start_rng
                position["epoch_draws_base"] = self._epoch_draws_base
        return position

    def restore(self, position: Mapping[str, Any]) -> str | None:
        """Go back to ``position``; the caller restores the RNG streams afterwards.

        Returns a warning when the position cannot be restored (a plain iterable)."""
        self.epoch = position["epoch"]
        self.batches_in_epoch = position["batches_in_epoch"]
        self.skip = {(e, i) for e, i in position.get("skip", [])}
        self._iterator = None
        self._base_seed_drawn = position.get("base_seed_drawn", False)
        if self.kind == STATEFUL:
            self.data.load_state_dict(position["state"])  # type: ignore[attr-defined]
            if position["started"]:
                _set_epoch(self.data, self.epoch)
                self._iterator = iter(self.data)
            return None
        if not position["started"]:
            return None
        if self.kind == LOADER:
            draws_base = position.get("epoch_draws_base", True)
            self._resume_loader(position["epoch_start_rng"], draws_base)
            return None
        if self.kind == SEQUENCE:
            _set_epoch(self.data, self.epoch)
            self._iterator = itertools.islice(iter(self.data), self.batches_in_epoch, None)
            return None
        skipped = self.batches_in_epoch
        self.batches_in_epoch = 0
        self._start_epoch()
        return (
            f"the data ({type(self.data).__name__}) has no state_dict()/load_state_dict() and is "
            f"not a DataLoader over a map-style dataset, so its position (batch {skipped} of "
            f"epoch {self.epoch}) cannot be restored; it starts again from its beginning. Use "
            "torchdata's StatefulDataLoader or give the data state_dict()/load_state_dict() "
            "for an exact resume. See runbooks/resume-mismatch.md"
        )

    def _resume_loader(self, epoch_start_rng: Mapping[str, Any], draws_base: bool) -> None:
        """Create the epoch's iterator as it was created then, minus the batches used."""
        loader = self.data
        assert isinstance(loader, DataLoader)
        _set_epoch(loader, self.epoch)
        self._restore_rng(epoch_start_rng)
        self._epoch_start_rng = dict(epoch_start_rng)
        self._epoch_draws_base = draws_base
        batches = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
        skipping = _SkipFirst(batches, self.batches_in_epoch)
        copy = _copy_loader(loader, skipping, draw_base_seed=draws_base)
        self._iterator = iter(copy)
        skipping.draw()  # the sampler's own randomness, drawn now as it was then


def _set_epoch(data: Any, epoch: int) -> None:
    """``set_epoch(epoch)`` on the data, its sampler and its batch sampler's sampler,
    where they have it, once each."""
    objs = [data, getattr(data, "sampler", None),
            getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    unique: dict[int, Any] = {}
    for obj in objs:
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            unique.setdefault(id(obj), obj)
    for obj in unique.values():
        obj.set_epoch(epoch)


class _SkipFirst:
    """A (batch) sampler that yields what ``inner`` yields, minus the first ``skip``.

    The inner sampler is iterated in ``draw`` (or lazily), so that its randomness can be
    drawn at the same point in the RNG sequence as in the original run."""

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner = inner
        self.skip = skip
        self._iterator: Iterator[Any] | None = None

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)

    def __iter__(self) -> Iterator[Any]:
        return self._rest()

    def _rest(self) -> Iterator[Any]:
        self.draw()
        assert self._iterator is not None
        yield from self._iterator

    def draw(self) -> None:
        if self._iterator is None:
            iterator = iter(self.inner)
            self._iterator = itertools.chain(
                [first] if (first := next(iterator, _END)) is not _END else [], iterator
            )
            for _ in range(self.skip):
                if next(self._iterator, _END) is _END:
                    break


_END = object()


@contextlib.contextmanager
def _base_seed_aside(loader: DataLoader[Any]) -> Iterator[None]:
    """The workers' base seed drawn from a throwaway generator, not the run's streams
    (the loader's sampler keeps its own generator)."""
    generator = loader.generator
    loader.generator = torch.Generator()
    try:
        yield
    finally:
        loader.generator = generator


def _copy_loader(
    loader: DataLoader[Any], sampler: _SkipFirst, *, draw_base_seed: bool
) -> DataLoader[Any]:
    """``loader`` again, same settings, with ``sampler`` as its (batch) sampler; its
    workers' base seed drawn as the loader draws it, or from a throwaway generator. Not
    persistent: it serves one partial epoch."""
    workers = loader.num_workers
    common: dict[str, Any] = dict(
        num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        generator=loader.generator if draw_base_seed else torch.Generator(),
        prefetch_factor=loader.prefetch_factor if workers else None,
        pin_memory_device=loader.pin_memory_device, in_order=loader.in_order,
    )
    if loader.batch_sampler is None:
        return DataLoader(loader.dataset, batch_size=None, sampler=sampler, **common)
    return DataLoader(loader.dataset, batch_sampler=sampler, **common)
