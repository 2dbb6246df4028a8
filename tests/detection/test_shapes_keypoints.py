"""The synthetic keypoint set: COCO keypoint records, corners as keypoints, flip pairs,
determinism."""

import json

import numpy as np
import pytest
import torch

from detection.data.coco import load_coco_json
from detection.data.keypoints import check_keypoints, flip_indices
from detection.data.mapper import DatasetMapper, annotation_to_mask
from detection.data.shapes_keypoints import (
    KEYPOINT_NAMES,
    KEYPOINT_OKS_SIGMAS,
    ensure_shapes_keypoints_dataset,
    quad_corners,
)

LT, RT, RB, LB = range(4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_shapes_keypoints_dataset(tmp_path_factory.mktemp("kp"), num_train=16,
                                           num_val=6, seed=0)


def test_json_passes_the_keypoint_record_checks(tiny):
    data = json.loads(tiny.train_json.read_text())
    (cat,) = data["categories"]
    assert cat["keypoints"] == list(KEYPOINT_NAMES)
    assert cat["skeleton"] == [[1, 2], [2, 3], [3, 4], [4, 1]]
    vis = []
    for a in data["annotations"]:
        kps = check_keypoints(a["keypoints"], len(KEYPOINT_NAMES), f"annotation {a['id']}")
        v = kps[2::3]
        assert a["num_keypoints"] == sum(1 for x in v if x > 0)
        for j in range(4):  # outside the image: COCO's (0, 0, 0)
            if v[j] == 0:
                assert kps[3 * j:3 * j + 2] == [0.0, 0.0]
        vis += v
    assert {0.0, 1.0, 2.0} <= set(vis)  # every visibility occurs
    records, meta = load_coco_json(tiny.train_json, tiny.train_images)
    assert meta["thing_classes"] == ["quad"]
    assert meta["keypoint_names"] == list(KEYPOINT_NAMES)
    assert sorted(meta["keypoint_flip_map"]) == [("left_bottom", "right_bottom"),
                                                 ("left_top", "right_top")]
    assert flip_indices(meta["keypoint_names"], meta["keypoint_flip_map"]) == [RT, LT, LB, RB]
    assert sum(len(r["annotations"]) for r in records) == len(data["annotations"])
    assert all(len(a["keypoints"]) == 12 for r in records for a in r["annotations"])


def test_keypoints_sit_on_the_quads_corners(tiny):
    records, _ = load_coco_json(tiny.train_json, tiny.train_images)
    n_visible = n_covered = 0
    for r in records:
        h, w = r["height"], r["width"]
        for a in r["annotations"]:
            m = annotation_to_mask(a["segmentation"], h, w).astype(bool)
            x0, y0, x1, y1 = a["bbox"]
            kps = np.asarray(a["keypoints"]).reshape(4, 3)
            for x, y, v in kps:
                if v == 0:
                    continue
                assert x0 <= x <= x1 and y0 <= y <= y1  # a covered corner too: amodal box
                px, py = int(x), int(y)
                if v == 2:  # on the visible part, at its edge
                    assert m[py, px]
                    around = m[max(py - 1, 0):py + 2, max(px - 1, 0):px + 2]
                    assert not around.all() or px in (0, w - 1) or py in (0, h - 1)
                    n_visible += 1
                else:  # covered by a later quad
                    assert not m[py, px]
                    n_covered += 1
            both = kps[:, 2] > 0
            if both[LT] and both[RT]:
                assert kps[LT, 0] < kps[RT, 0]
            if both[LT] and both[LB]:
                assert kps[LT, 1] < kps[LB, 1]
    assert n_visible > 30 and n_covered > 0


def test_left_and_right_stay_apart_for_every_quad():
    for i in range(300):
        c = quad_corners(np.random.default_rng(i), 200, 240)
        assert c[LT, 0] < c[RT, 0] and c[LB, 0] < c[RB, 0]
        assert c[LT, 1] < c[LB, 1] and c[RT, 1] < c[RB, 1]


def test_flip_gives_the_mirrored_keypoints_with_pairs_exchanged(tiny):
    records, meta = load_coco_json(tiny.train_json, tiny.train_images)
    perm = flip_indices(meta["keypoint_names"], meta["keypoint_flip_map"])
    kwargs = dict(min_size_train=(200,), max_size_train=1000, keypoint_on=True,
                  keypoint_flip_indices=perm)
    plain = DatasetMapper(True, hflip_prob=0.0, **kwargs)
    flip = DatasetMapper(True, hflip_prob=1.0, **kwargs)
    checked = 0
    for r in records[:6]:
        a = plain(r, np.random.default_rng(0))
        b = flip(r, np.random.default_rng(0))
        nw = a["image"].shape[-1]
        assert torch.equal(b["image"], a["image"].flip(-1))
        ka, kb = a["instances"]["keypoints"], b["instances"]["keypoints"]
        want = ka[:, perm].clone()
        want[..., 0] = nw - want[..., 0]
        assert torch.equal(kb[..., 2], want[..., 2])
        shown = kb[..., 2] > 0
        assert torch.allclose(kb[..., :2][shown], want[..., :2][shown], atol=1e-4)
        # still left of right after the flip
        lr = shown[:, LT] & shown[:, RT]
        assert (kb[lr, LT, 0] < kb[lr, RT, 0]).all()
        checked += int(shown.sum())
    assert checked > 10


def test_ground_truth_scores_full_keypoint_ap_with_the_sigmas(tiny):
    from detection.evaluation.coco_evaluation import COCOEvaluator

    records, _ = load_coco_json(tiny.val_json, tiny.val_images)
    ev = COCOEvaluator((str(tiny.val_json), None), tasks=("bbox", "keypoints"),
                       kpt_oks_sigmas=KEYPOINT_OKS_SIGMAS)
    for r in records:
        anns = r["annotations"]
        ev.process([{"image_id": r["image_id"]}], [{
            "boxes": torch.tensor([a["bbox"] for a in anns]).view(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.zeros(len(anns), dtype=torch.int64),
            "keypoints": torch.tensor([a["keypoints"] for a in anns]).view(-1, 4, 3),
        }])
    res = ev.evaluate()
    assert res["keypoints"]["AP"] == pytest.approx(100.0)
    assert res["bbox"]["AP"] == pytest.approx(100.0)


def test_generation_is_deterministic_cached_and_registered(tmp_path):
    from detection.data.catalog import DatasetCatalog

    a = ensure_shapes_keypoints_dataset(tmp_path / "a", num_train=5, num_val=2, seed=3)
    b = ensure_shapes_keypoints_dataset(tmp_path / "b", num_train=5, num_val=2, seed=3)
    assert a.train_json.read_bytes() == b.train_json.read_bytes()
    assert a.val_json.read_bytes() == b.val_json.read_bytes()
    img = "000004.jpg"
    assert (a.train_images / img).read_bytes() == (b.train_images / img).read_bytes()
    c = ensure_shapes_keypoints_dataset(tmp_path / "a", num_train=5, num_val=2, seed=4)
    assert c.root != a.root and c.train_json.read_bytes() != a.train_json.read_bytes()
    mtime = a.train_json.stat().st_mtime_ns
    assert ensure_shapes_keypoints_dataset(tmp_path / "a", num_train=5, num_val=2, seed=3) == a
    assert a.train_json.stat().st_mtime_ns == mtime  # reused, not written again
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]
    (a.root / "manifest.json").write_text('{"version": -1}')  # damaged: regenerated
    again = ensure_shapes_keypoints_dataset(tmp_path / "a", num_train=5, num_val=2, seed=3)
    assert again.train_json.read_bytes() == b.train_json.read_bytes()
    assert {"shapes_keypoints_train", "shapes_keypoints_val"} <= set(DatasetCatalog.list())


def test_config_paths_take_the_datasets_flip_pairs(tiny):
    """The training mapper and keypoint TTA built from a config flip with the pairs the
    datasets name ([1, 0, 3, 2] for the corners), not COCO's persons'; a NUM_KEYPOINTS that
    does not match the dataset is refused, naming both."""
    from detection.config import load_config
    from detection.data.catalog import register_coco_instances
    from detection.engine.loading import build_model_from_cfg
    from detection.modeling.tta import build_tta_model

    for split in ("train", "val"):
        register_coco_instances(f"kp_tiny_{split}", str(getattr(tiny, f"{split}_json")),
                                str(getattr(tiny, f"{split}_images")))
    opts = ["DATASETS.TRAIN", "('kp_tiny_train',)", "DATASETS.TEST", "('kp_tiny_val',)",
            "TEST.AUG.FLIP", "True", "TEST.AUG.MIN_SIZES", "(160,)"]
    cfg = load_config("keypoint_rcnn_r18_fpn_shapes.yaml", opts)
    assert DatasetMapper.from_config(cfg, is_train=True).keypoint_flip_indices == [1, 0, 3, 2]
    tta = build_tta_model(cfg, build_model_from_cfg(cfg).eval(), enabled=True)
    assert tta.keypoint_flip_indices == [1, 0, 3, 2]
    bad = load_config("keypoint_rcnn_r18_fpn_shapes.yaml",
                      opts + ["MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "17"])
    with pytest.raises(ValueError, match="NUM_KEYPOINTS is 17 but dataset 'kp_tiny_train' names 4"):
        DatasetMapper.from_config(bad, is_train=True)
