import itertools

import numpy as np
import pytest
import torch

from detection.config import get_cfg
from detection.data.build import build_train_loader
from detection.data.mapper import DatasetMapper
from detection.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler


def _take(it, n):
    return list(itertools.islice(iter(it), n))


@pytest.mark.parametrize("size,world", [(10, 3), (12, 4), (7, 1)])
def test_training_shards_cover_each_epoch(size, world):
    per_rank = [len(range(r, size, world)) for r in range(world)]
    seen = []
    for r in range(world):
        keys = _take(TrainingSampler(size, seed=3, rank=r, world_size=world), per_rank[r] * 2)
        assert {e for _, e in keys[: per_rank[r]]} == {0}
        assert {e for _, e in keys[per_rank[r] :]} == {1}
        seen.append([i for i, _ in keys[: per_rank[r]]])
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(size))  # disjoint and covering in epoch 0
    a = _take(TrainingSampler(size, seed=3, rank=0, world_size=world), 2 * size)
    b = _take(TrainingSampler(size, seed=4, rank=0, world_size=world), 2 * size)
    assert a != b  # the seed matters


@pytest.mark.parametrize("size,world", [(10, 3), (2, 4), (9, 3), (0, 2)])
def test_inference_shards_disjoint_no_repeats(size, world):
    shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert flat == list(range(size))  # in order, each index exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_resume_training_sampler():
    full = _take(TrainingSampler(11, seed=1, rank=1, world_size=2), 40)
    for k in (0, 3, 5, 6, 17):
        resumed = _take(TrainingSampler(11, seed=1, rank=1, world_size=2, start=k), 40 - k)
        assert resumed == full[k:]


def test_aspect_ratio_grouping_and_resume():
    groups = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1]
    sampler = TrainingSampler(len(groups), seed=2, rank=0, world_size=1)
    batches = _take(GroupedBatchSampler(sampler, groups, 4), 12)
    for b in batches:
        assert len(b) == 4
        assert len({groups[i] for i, _ in b}) == 1
    resumed = _take(GroupedBatchSampler(sampler, groups, 4, start_batch=5), 7)
    assert resumed == batches[5:]


def test_train_loader_resume_reproduces_augmentation(tmp_path, coco_writer):
    rng = np.random.default_rng(0)
    images, anns, pixels = [], [], {}
    for i in range(1, 9):
        h, w = (40, 60) if i % 3 else (60, 40)
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        pixels[i] = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        anns.append(
            {"id": i, "image_id": i, "category_id": 7, "bbox": [2, 3, 20, 15], "iscrowd": 0}
        )
    path = coco_writer(tmp_path, images, anns, pixels=pixels)
    from detection.data.coco import load_coco_json

    records, _ = load_coco_json(path, tmp_path / "images")
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"])
    mapper = DatasetMapper(True, min_size_train=(40, 50, 60), max_size_train=100)
    for grouping in (True, False):
        cfg.DATALOADER.ASPECT_RATIO_GROUPING = grouping
        full = _take(build_train_loader(cfg, mapper=mapper, records=records), 9)
        resumed = _take(build_train_loader(cfg, mapper=mapper, records=records, start_iter=5), 4)
        for x, y in zip(full[5:], resumed):
            assert [d["image_id"] for d in x] == [d["image_id"] for d in y]
            for a, b in zip(x, y):
                assert torch.equal(a["image"], b["image"])
                assert torch.equal(a["instances"]["boxes"], b["instances"]["boxes"])
        if grouping:
            for batch in full:
                assert len({d["image"].shape[1] <= d["image"].shape[2] for d in batch}) == 1
