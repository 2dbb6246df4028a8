"""Data loaders from the config: the training stream and the per-dataset test loader.

Both check their records first as ``cfg.DATALOADER.CHECK_DATA`` says ("fast", "full", "off";
see :mod:`detection.data.check`): unusable records are left out, and the log says how many and
why, or, with ``DATALOADER.SKIP_MISSING_IMAGES`` False, :class:`~detection.data.check.
DataCheckError` stops the run with the table of problems. A check is done once per process for
the same records and mode (periodic evaluation does not repeat it); under torch.distributed,
rank 0 checks and the others receive its report, so every rank keeps the same records. The
report of a dataset read from a json is saved on disk and reused by the next start while the
json and image folders are unchanged (``DATALOADER.CHECK_DATA_CACHE``; False checks again and
replaces it; :func:`~detection.data.check.cached_check`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from detection.data.catalog import DatasetCatalog, get_metadata, set_datasets_root
from detection.data.check import MODES, DataCheckError, apply_report, cached_check, check_records
from detection.data.coco import filter_images_without_annotations
from detection.data.keypoints import filter_images_with_few_keypoints
from detection.data.mapper import DatasetMapper, MapDataset, UnreadableImage
from detection.data.report import DataReport
from detection.data.samplers import (
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    dist_rank_world,
)
from detection.data.serialized import SerializedRecords

__all__ = [
    "Batch",
    "build_test_loader",
    "checked_records",
    "build_train_loader",
    "get_dataset_records",
    "eval_batch_collator",
    "trivial_batch_collator",
]

logger = logging.getLogger(__name__)


def trivial_batch_collator(batch: list) -> list:
    """A batch is the list of mapped dicts; None (skipped unreadable images) is dropped."""
    return [b for b in batch if b is not None]


class Batch(list):
    """A test batch: the list of mapped dicts, plus the images dropped from it.

    ``unreadable`` holds the file names the mapper could not use (with
    ``DATALOADER.SKIP_MISSING_IMAGES``) and ``num_unreadable`` their number; an evaluation
    loop counts them and skips a batch that is empty. Otherwise a plain list.
    """

    def __init__(self, items: Sequence = (), unreadable: Sequence[str] = ()) -> None:
        super().__init__(items)
        self.unreadable: list[str] = list(unreadable)

    @property
    def num_unreadable(self) -> int:
        return len(self.unreadable)


def eval_batch_collator(batch: list) -> Batch:
    """The test loader's collate: usable items in a :class:`Batch`; unusable ones counted."""
    items = [b for b in batch if b is not None and not isinstance(b, UnreadableImage)]
    gone = [b.file_name if isinstance(b, UnreadableImage) else "?" for b in batch
            if b is None or isinstance(b, UnreadableImage)]
    return Batch(items, gone)


_CHECKED: dict[tuple, DataReport] = {}


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result broadcast to the other ranks (or just ``fn()``)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_mode(cfg: Any, mode: str | None) -> str:
    mode = str(cfg.DATALOADER.CHECK_DATA if mode is None else mode).lower()
    if mode not in MODES:
        raise ValueError(f"DATALOADER.CHECK_DATA must be one of {MODES}, got {mode!r}")
    return mode


def _sources(names: Sequence[str]) -> list[tuple[str, str]] | None:
    """(json file, image folder) of each named dataset; None when one has no json."""
    sources = []
    for n in names:
        meta = get_metadata(n)
        if not meta.get("json_file") or not meta.get("image_root"):
            return None
        sources.append((str(meta["json_file"]), str(meta["image_root"])))
    return sources or None


def check_report(cfg: Any, records: list[dict], names: Sequence[str] = (), *,
                 mode: str | None = None, progress: bool = True,
                 reuse: bool | None = None) -> DataReport:
    """The data check's report on ``records`` (mode: ``cfg.DATALOADER.CHECK_DATA`` unless
    given; "fast" or "full"). ``names`` are the datasets the records come from: the
    annotations their json loader skipped are added, and when each has a json the report is
    saved on disk and reused while they are unchanged (``reuse``, default
    ``cfg.DATALOADER.CHECK_DATA_CACHE``; False checks again and replaces the saved report).
    Cached per process; shared by rank 0."""
    mode = _check_mode(cfg, mode)
    if reuse is None:
        reuse = bool(cfg.DATALOADER.get("CHECK_DATA_CACHE", True))
    model = cfg.get("MODEL", None)
    mask_on = bool(model.get("MASK_ON", False)) if model is not None else False
    name = ",".join(names) if names else "the given records"
    key = (name, mode, mask_on, hash(tuple(
        (r.get("file_name"), r.get("height"), r.get("width"), len(r.get("annotations") or ()))
        for r in records)))
    if key in _CHECKED:
        return _CHECKED[key]
    skipped: dict[str, list] = {}
    for n in names:
        for kind, ids in get_metadata(n).get("load_problem_ids", {}).items():
            skipped.setdefault(kind, []).extend(ids)
    show = progress and dist_rank_world()[0] == 0
    options = dict(mode=mode, mask_on=mask_on, name=name, progress=show,
                   workers=min(8, os.cpu_count() or 1), load_problems=skipped)
    sources = _sources(names) if names else None

    def run() -> DataReport:
        if sources is None:
            return check_records(records, **options)
        return cached_check(records, sources=sources, reuse=reuse, **options)

    report = _on_rank0(run)
    if len(_CHECKED) > 16:
        _CHECKED.clear()
    _CHECKED[key] = report
    return report


def use_datasets_root(cfg: Any) -> None:
    """``DATASETS.ROOT``, when set, as the root of the built-in datasets: called before
    anything reads a dataset or its metadata (training, evaluation, the data check)."""
    if cfg.DATASETS.ROOT:
        set_datasets_root(cfg.DATASETS.ROOT)


def check_datasets(cfg: Any, names: Sequence[str], *, mode: str | None = None
                   ) -> dict[str, DataReport]:
    """Load and check each named dataset (tools/check_data.py); one report per name. Every
    image is checked (no saved report is read), and the reports are saved for training."""
    use_datasets_root(cfg)
    return {n: check_report(cfg, get_dataset_records(n, filter_empty=False), [n], mode=mode,
                            reuse=False)
            for n in names}


def checked_records(cfg: Any, records: list[dict], names: Sequence[str] = (), *,
                    mode: str | None = None) -> list[dict]:
    """``records`` after the data check ``cfg.DATALOADER.CHECK_DATA`` (module doc): the usable
    ones, or DataCheckError with the table when some are unusable and skipping is off."""
    if _check_mode(cfg, mode) == "off":
        return records
    report = check_report(cfg, records, names, mode=mode)
    name = report.name
    kept = apply_report(records, report, skip=bool(cfg.DATALOADER.SKIP_MISSING_IMAGES),
                        log=logger)
    if not kept:
        raise DataCheckError(f"No usable records left in {name} after the data check:\n"
                             f"{report.table()}")
    return kept


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
    use_datasets_root(cfg)
    owned = records is None  # a list built here: its dicts are freed as they are serialized
    if records is None:
        names = list(cfg.DATASETS.TRAIN)
        records = checked_records(cfg, get_dataset_records(names, filter_empty=False), names)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            records = filter_images_without_annotations(records)
            if not records:
                raise ValueError(f"No images with annotations in {names}")
        min_keypoints = (cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                         if cfg.MODEL.get("KEYPOINT_ON", False) else 0)
        if min_keypoints > 0:
            records = filter_images_with_few_keypoints(records, min_keypoints)
            if not records:
                raise ValueError(f"No images with {min_keypoints} or more visible keypoints "
                                 f"in {names} (MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE)")
    else:
        records = checked_records(cfg, records)
    mapper = mapper or DatasetMapper.from_config(cfg, is_train=True)
    seed = int(cfg.SEED if seed is None else seed)
    rank, world = dist_rank_world()
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total % world != 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} is not divisible by world size {world}")
    batch = total // world
    groups = [0 if r["width"] >= r["height"] else 1 for r in records]
    # one buffer instead of a list of dicts: forked workers do not copy it page by page
    t0 = time.perf_counter()
    dataset = MapDataset(SerializedRecords(records, release=owned), mapper, seed=seed)
    del records
    logger.info("%d training records held serialized in %.1f MiB (%.1f s)", len(dataset),
                dataset.records.nbytes / 2**20, time.perf_counter() - t0)
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        sampler = TrainingSampler(len(dataset), seed=seed, rank=rank, world_size=world)
        batch_sampler = GroupedBatchSampler(sampler, groups, batch, start_batch=start_iter)
    else:
        sampler = TrainingSampler(
            len(dataset), seed=seed, rank=rank, world_size=world, start=start_iter * batch
        )
        batch_sampler = GroupedBatchSampler(sampler, [0] * len(dataset), batch)
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
    """This rank's disjoint shard of ``dataset_name`` in order, un-augmented (is_train=False).

    Batches are :class:`Batch` lists: images the mapper could not read are dropped from them
    and named in ``batch.unreadable``. ``loader.left_out`` names the records the data check
    left out before (the log has said why).
    """
    use_datasets_root(cfg)
    all_records = get_dataset_records(dataset_name, filter_empty=False)
    records = checked_records(cfg, all_records, [dataset_name])
    mapper = mapper or DatasetMapper.from_config(cfg, is_train=False)
    sampler = InferenceSampler(len(records))
    loader = DataLoader(
        MapDataset(SerializedRecords(records), mapper),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        collate_fn=eval_batch_collator,
    )
    loader.left_out = []  # file names of the records the check left out
    if len(records) < len(all_records):
        report = check_report(cfg, all_records, [dataset_name])  # cached: no second check
        loader.left_out = [all_records[i]["file_name"] for i in sorted(report.unusable)]
    return loader
