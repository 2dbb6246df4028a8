"""Samplers: infinite sharded training stream, aspect-ratio grouped batches, inference shards.

The training stream is a function of ``(seed, rank, world_size)`` only: epoch ``e`` is the
permutation drawn from ``torch.Generator().manual_seed(seed + e)`` (the same on every rank), and
rank ``r`` takes every ``world_size``-th element from position ``r``. Each item is
``(index, epoch)`` so that the dataset can seed augmentation from it. Resuming is exact:
``TrainingSampler(start=k)`` skips k items of this rank's stream arithmetically, and
``GroupedBatchSampler(start_batch=k)`` skips k batches by replaying the (cheap) index stream.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "GroupedBatchSampler",
    "InferenceSampler",
    "TrainingSampler",
    "dist_rank_world",
]


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed, or (0, 1) when it is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingSampler(Sampler):
    """Infinite stream of ``(index, epoch)`` for this rank; see the module doc."""

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        r, w = dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.size = size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.start = int(start)

    def _epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.size, generator=g).tolist()
        else:
            perm = list(range(self.size))
        return perm[self.rank :: self.world_size]

    def _per_epoch(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = self._per_epoch()
        if per_epoch == 0:
            raise ValueError(f"rank {self.rank} gets no images of {self.size}; fewer ranks needed")
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            for i in self._epoch_indices(epoch)[offset:]:
                yield (i, epoch)
            offset = 0
            epoch += 1


class GroupedBatchSampler(Sampler):
    """Batch an infinite ``(index, epoch)`` stream so that each batch has one aspect group.

    ``group_ids[index]`` is 0 for landscape (w >= h) and 1 for portrait images; with one group
    this is plain batching. ``start_batch`` skips that many batches (exact resume).
    """

    def __init__(
        self,
        sampler: Sampler,
        group_ids: Sequence[int],
        batch_size: int,
        *,
        start_batch: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.start_batch = int(start_batch)

    def _batches(self) -> Iterator[list]:
        buckets: dict[int, list] = {}
        for key in self.sampler:
            index = key[0] if isinstance(key, tuple) else key
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(key)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[list]:
        return itertools.islice(self._batches(), self.start_batch, None)


class InferenceSampler(Sampler):
    """This rank's contiguous shard of ``range(size)``: disjoint, covering, no repeats.

    Shard sizes differ by at most one; no padding, so gathered results need no dedup
    (the evaluator dedupes by image_id anyway).
    """

    def __init__(self, size: int, *, rank: int | None = None, world_size: int | None = None):
        r, w = dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        base, extra = divmod(size, self.world_size)
        begin = self.rank * base + min(self.rank, extra)
        end = begin + base + (1 if self.rank < extra else 0)
        self.indices = range(begin, end)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
