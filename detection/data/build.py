"""Data loaders from the config: the training stream and the per-dataset test loader."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from detection.data.catalog import DatasetCatalog, set_datasets_root
from detection.data.coco import filter_images_without_annotations
from detection.data.mapper import DatasetMapper, MapDataset
from detection.data.samplers import (
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    dist_rank_world,
)

__all__ = [
    "build_test_loader",
    "build_train_loader",
    "get_dataset_records",
    "trivial_batch_collator",
]

logger = logging.getLogger(__name__)


def trivial_batch_collator(batch: list) -> list:
    """A batch is the list of mapped dicts; None (skipped unreadable images) is dropped."""
    return [b for b in batch if b is not None]


def get_dataset_records(names: str | tuple[str, ...] | list[str], *, filter_empty: bool) -> list:
    """Concatenated records of the named datasets, optionally without images lacking boxes."""
    if isinstance(names, str):
        names = [names]
    records = []
    for name in names:
        recs = DatasetCatalog.get(name)
        if not recs:
            raise ValueError(f"Dataset '{name}' is empty")
        records.extend(recs)
    if filter_empty:
        records = filter_images_without_annotations(records)
    if not records:
        raise ValueError(f"No images with annotations in {list(names)}")
    return records


def _worker_init(seed: int):
    def init(worker_id: int) -> None:
        s = (seed * 1000 + worker_id) % 2**32
        np.random.seed(s)
        random.seed(s)
        torch.manual_seed(s)

    return init


def build_train_loader(
    cfg: Any,
    *,
    mapper: DatasetMapper | None = None,
    records: list[dict] | None = None,
    start_iter: int = 0,
    seed: int | None = None,
) -> DataLoader:
    """Infinite loader of training batches (lists of mapper dicts) for this rank.

    The global batch ``cfg.SOLVER.IMS_PER_BATCH`` is divided among the ranks. ``start_iter``
    resumes the stream: batch ``start_iter`` of an uninterrupted run comes first, with the same
    augmentation (see :mod:`detection.data.samplers` and :class:`MapDataset`).
    """
    if cfg.DATASETS.ROOT:
        set_datasets_root(cfg.DATASETS.ROOT)
    if records is None:
        records = get_dataset_records(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    mapper = mapper or DatasetMapper.from_config(cfg, is_train=True)
    seed = int(cfg.SEED if seed is None else seed)
    rank, world = dist_rank_world()
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total % world != 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} is not divisible by world size {world}")
    batch = total // world
    dataset = MapDataset(records, mapper, seed=seed)
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        groups = [0 if r["width"] >= r["height"] else 1 for r in records]
        sampler = TrainingSampler(len(records), seed=seed, rank=rank, world_size=world)
        batch_sampler = GroupedBatchSampler(sampler, groups, batch, start_batch=start_iter)
    else:
        sampler = TrainingSampler(
            len(records), seed=seed, rank=rank, world_size=world, start=start_iter * batch
        )
        batch_sampler = GroupedBatchSampler(sampler, [0] * len(records), batch)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=_worker_init(seed + 7919 * rank),
        persistent_workers=workers > 0,
        # its own generator: creating the iterator must not draw from the global torch RNG,
        # whose state a resumed run restores from the checkpoint
        generator=torch.Generator().manual_seed(seed + 7919 * rank),
    )


def build_test_loader(
    cfg: Any,
    dataset_name: str,
    *,
    mapper: DatasetMapper | None = None,
    batch_size: int = 1,
) -> DataLoader:
    """This rank's disjoint shard of ``dataset_name`` in order, un-augmented (is_train=False)."""
    if cfg.DATASETS.ROOT:
        set_datasets_root(cfg.DATASETS.ROOT)
    records = get_dataset_records(dataset_name, filter_empty=False)
    mapper = mapper or DatasetMapper.from_config(cfg, is_train=False)
    sampler = InferenceSampler(len(records))
    return DataLoader(
        MapDataset(records, mapper),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        collate_fn=trivial_batch_collator,
    )
