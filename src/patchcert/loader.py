"""Streaming data for training, certification and attacks, on ``torch.utils.data``.

* :func:`load_batches` reads given index batches of any :class:`~patchcert.data.ImageSource`
  through a ``DataLoader`` (worker processes decode while the model runs; pinned memory on
  CUDA) and yields ``(x uint8 [B, C, H, W], y int64 [B], idx int64 [B])`` in order. In-memory
  data without workers is indexed directly.
* :class:`EpochBatchSampler` is the training order: a permutation of the training set drawn
  from a generator seeded by ``(seed, epoch)`` alone, cut into global batches of
  ``batch_size`` (the last partial batch dropped); under ``torchrun`` rank ``r`` of ``W`` gets
  ``batch[r::W]`` of every global batch, so each rank reads (and decodes) only its share.
* :class:`TrainView` is the augmented training view: example ``i`` of epoch ``e`` is augmented
  by its own generator seeded by ``(seed, e, i)`` (:func:`example_generator`), in whichever
  worker, rank or order it is read.

So the streaming training path is a pure function of ``(seed, epoch, index)``: it needs no RNG
state to resume (an interrupted run resumes bit-identically after its last finished epoch), it
does not depend on the number of workers, and a run on ``W`` processes sees the same augmented
global batches as a run on one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .data import ImageSource, augment_crop_flip, center_crop, random_crop_flip
from .errors import DataError
from .runtime import bound_allocator

log = logging.getLogger(__name__)

__all__ = [
    "mix_seed",
    "example_generator",
    "EpochBatchSampler",
    "TrainView",
    "load_batches",
    "default_workers",
    "worker_start_method",
    "make_loader",
    "STREAM_SHUFFLE",
    "STREAM_AUGMENT",
    "STREAM_OBJECTIVE",
]

#: stream ids: independent random streams derived from the same (seed, epoch[, index])
STREAM_SHUFFLE, STREAM_AUGMENT, STREAM_OBJECTIVE = 1, 2, 3

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters): splitmix64 folded over the parts.

    Nearby tuples (``(0, 1, 5)`` vs ``(0, 1, 6)``) give unrelated seeds.
    """
    h = 0x5EED
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


def example_generator(seed: int, epoch: int, index: int, stream: int = STREAM_AUGMENT) -> torch.Generator:
    """The CPU generator of example ``index`` in ``epoch`` for one random ``stream``."""
    return torch.Generator().manual_seed(mix_seed(seed, stream, epoch, index))


class EpochBatchSampler:
    """Batches of ``(epoch, index)`` keys for this rank: ``batch[rank::world]`` of each global batch.

    The global order of epoch ``e`` is ``randperm(n)`` from a generator seeded by
    ``mix_seed(seed, STREAM_SHUFFLE, e)``; global batch ``t`` is ``order[t*B:(t+1)*B]``; the last
    partial batch is dropped (every step sees ``batch_size`` examples), so an epoch has
    ``n // batch_size`` steps on every rank. Call :meth:`set_epoch` before iterating.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The global order of ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, STREAM_SHUFFLE, e)))

    def global_batches(self, epoch: int | None = None) -> list[torch.Tensor]:
        order = self.order(epoch)
        b = self.batch_size
        return [order[s:s + b] for s in range(0, (self.n // b) * b, b)]

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        e = self.epoch
        for g in self.global_batches(e):
            yield [(e, int(i)) for i in g[self.rank::self.world]]


class TrainView(torch.utils.data.Dataset):
    """The augmented training view of ``source``, keyed by ``(epoch, index)``.

    ``source[index]`` is decoded and, if ``augment``, augmented with
    :func:`example_generator` ``(seed, epoch, index)``: CIFAR-style data (no ``info["crop"]``)
    gets a random crop with zero padding 4 and a random horizontal flip; image-folder training
    views (``info["crop"] = s``) a random ``s x s`` crop and a flip (without ``augment``: the
    centre crop). Returns ``(uint8 [C, h, w], label, index)``.
    """

    def __init__(self, source: ImageSource, augment: bool, seed: int) -> None:
        self.source, self.augment, self.seed = source, bool(augment), int(seed)
        crop = source.info.get("crop")
        self.crop = int(crop) if crop else None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.crop, self.crop) if self.crop else tuple(self.source.image_size)  # type: ignore[return-value]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int | str, int]:
        epoch, index = key
        try:
            x, y = self.source[index]
        except DataError as e:  # told to the main process as data: one line there, no worker traceback
            return None, str(e), int(index)
        x = x[None]
        if self.crop is None:
            if self.augment:
                x = augment_crop_flip(x, 4, generator=example_generator(self.seed, epoch, index))
        elif self.augment:
            x = random_crop_flip(x, self.crop, generator=example_generator(self.seed, epoch, index))
        else:
            x = center_crop(x, self.crop)
        return x[0].contiguous(), int(y), int(index)


class _Indexed(torch.utils.data.Dataset):
    """``source[i] -> (image, label, i)`` for evaluation reads."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int | str, int]:
        try:
            x, y = self.source[int(i)]
        except DataError as e:  # told to the main process as data: one line there, no worker traceback
            return None, str(e), int(i)
        return x, int(y), int(i)


def _collate(items: list[tuple[torch.Tensor | None, int | str, int]]) -> tuple:
    """``(x, y, idx)`` of the readable items, plus ``[(index, reason), ...]`` of the unreadable
    ones as a fourth element when there are any (an image that failed to decode)."""
    bad = [(int(i), str(y)) for x, y, i in items if x is None]
    good = [t for t in items if t[0] is not None]
    x = torch.stack([t[0] for t in good]) if good else torch.zeros(0, dtype=torch.uint8)  # type: ignore[misc]
    out = (x, torch.tensor([t[1] for t in good], dtype=torch.int64), torch.tensor([t[2] for t in good], dtype=torch.int64))
    return (*out, bad) if bad else out


def _checked(item: tuple, on_bad: Callable[[int, str], None] | None = None) -> tuple:
    """A collated batch with its unreadable images: a one-line DataError naming the first file,
    or, with ``on_bad(index, reason)``, each reported and the batch without them."""
    if len(item) == 3:
        return item
    if on_bad is None:
        raise DataError(item[3][0][1])
    for i, reason in item[3]:
        on_bad(i, reason)
    return item[:3]


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose batches are checked (:func:`_checked`): an unreadable image in a worker is
    one line naming its file, not "Caught DataError in DataLoader worker process 0" and a traceback."""

    def __iter__(self):  # type: ignore[override]
        for item in super().__iter__():
            yield _checked(item)


def default_workers(source: ImageSource | TrainView) -> int:
    """Worker processes for reading ``source``: 0 for in-memory data, else ``min(4, cpus)``
    (``$PATCHCERT_DATA_WORKERS`` overrides)."""
    env = os.environ.get("PATCHCERT_DATA_WORKERS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            log.warning("ignoring PATCHCERT_DATA_WORKERS=%r (not an integer)", env)
    src = source.source if isinstance(source, TrainView) else source
    if getattr(src, "in_memory", False):
        return 0
    return min(4, os.cpu_count() or 1)


_START_METHODS = ("forkserver", "spawn", "fork")
_preload_set = False


def worker_start_method() -> str | None:
    """How DataLoader workers start: ``$PATCHCERT_WORKER_START`` (forkserver | spawn | fork), else
    ``forkserver`` where the platform has it, else the platform's default (``None``).

    Forked workers share the parent's pages copy-on-write; every page the parent rewrites later
    (its allocator reusing freed activations, parameters and optimizer state updated in place)
    stays behind, privately, in every worker: a worker forked from a trained model grows towards
    the parent's size. Workers from the fork server start from a small process that has imported
    only torch and patchcert, so their memory stays small whatever the parent holds. As with
    ``spawn`` (and Python 3.14's default), a script that starts workers must guard its entry
    point with ``if __name__ == "__main__":``; the ``patchcert`` command does.
    """
    global _preload_set
    env = os.environ.get("PATCHCERT_WORKER_START")
    methods = multiprocessing.get_all_start_methods()
    if env:
        if env not in _START_METHODS or env not in methods:
            log.warning("ignoring PATCHCERT_WORKER_START=%r (use one of %s)", env,
                        ", ".join(m for m in _START_METHODS if m in methods))
        else:
            method = env
            if method != "forkserver":
                return method
    if "forkserver" not in methods:
        return None
    if not _preload_set:  # workers forked from the server find torch and patchcert imported
        multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "patchcert.loader"])
        _preload_set = True
    return "forkserver"


def _init_worker(worker_id: int) -> None:
    """Every DataLoader worker: glibc thresholds fixed (:func:`patchcert.runtime.bound_allocator`),
    so decoding thousands of differently sized images does not grow the worker's heap."""
    bound_allocator()


def make_loader(dataset: torch.utils.data.Dataset, batch_sampler: Iterable, num_workers: int,
                pin_memory: bool = False, persistent: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batch_sampler`` with the collate of this module (``(x, y, idx)``).

    It has its own generator for the workers' base seed, so iterating it never advances the
    global torch RNG (which a resumed run restores: shake-shake, initialisation); the data's
    randomness comes from explicit per-example generators anyway. Workers start per
    :func:`worker_start_method`.
    """
    kw: dict = {}
    if num_workers > 0:
        kw = {"persistent_workers": persistent, "prefetch_factor": 2,
              "multiprocessing_context": worker_start_method(), "worker_init_fn": _init_worker}
    return _Loader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=_collate, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(0), **kw)


def load_batches(source: ImageSource, batches: Sequence[Sequence[int] | torch.Tensor], num_workers: int | None = None,
                 pin_memory: bool = False, on_bad: Callable[[int, str], None] | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Read ``batches`` (lists of indices) of ``source`` in order -> ``(x uint8, y int64, idx int64)``.

    ``num_workers`` (default :func:`default_workers`): DataLoader worker processes that decode
    the next batches while the caller computes. In-memory data without workers is indexed
    directly (no copies through the DataLoader). An image that cannot be decoded (in a worker
    or not) is a one-line :class:`~patchcert.errors.DataError` naming its file; with
    ``on_bad(index, reason)`` it is reported there instead and left out of its batch (a batch
    may then be empty: ``x`` of shape ``[0]``).
    """
    batches = [torch.as_tensor(b, dtype=torch.int64).reshape(-1) for b in batches]
    if num_workers is None:
        num_workers = default_workers(source)
    if num_workers == 0 and source.in_memory and not pin_memory:
        for b in batches:
            x, y = source.batch(b)
            yield x, y, b
        return
    loader = make_loader(_Indexed(source), [b.tolist() for b in batches], min(num_workers, len(batches)),
                         pin_memory=pin_memory)
    for item in torch.utils.data.DataLoader.__iter__(loader):
        yield _checked(item, on_bad)
