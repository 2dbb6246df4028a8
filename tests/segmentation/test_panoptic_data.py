"""COCO panoptic data: a json and PNGs written by hand read into records, the targets derived
from them (semantic map, instance masks and boxes), the round trip through the PNG encoding,
the bad-id errors naming the file, and the synthetic panoptic shapes set."""

import json

import numpy as np
import pytest
from PIL import Image

from segmentation.panoptic.data import (
    PanopticDatasetMapper,
    load_coco_panoptic_json,
    panoptic_targets,
)
from segmentation.panoptic.format import PanopticFormatError, read_panoptic_png, write_panoptic_png
from segmentation.panoptic.shapes import ensure_panoptic_shapes

CATEGORIES = [{"id": 20, "name": "sky", "isthing": 0}, {"id": 3, "name": "car", "isthing": 1},
              {"id": 1, "name": "person", "isthing": 1}, {"id": 21, "name": "grass", "isthing": 0}]


def _write(root, ids, segments, name="a"):
    """An image, its PNG of ``ids`` and a panoptic json with one annotation."""
    h, w = ids.shape
    (root / "images").mkdir(exist_ok=True)
    (root / "pan").mkdir(exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(root / "images" / f"{name}.jpg")
    write_panoptic_png(root / "pan" / f"{name}.png", ids)
    data = {"images": [{"id": 5, "file_name": f"{name}.jpg", "height": h, "width": w}],
            "annotations": [{"image_id": 5, "file_name": f"{name}.png",
                             "segments_info": segments}],
            "categories": CATEGORIES}
    (root / "pan.json").write_text(json.dumps(data))
    return load_coco_panoptic_json(root / "pan.json", root / "images", root / "pan")


def _example():
    # 6 x 8: sky (id 70000, needs the B channel) on top, grass below, a person (id 300) on
    # both, a crowd of cars (id 5) and two void pixels
    ids = np.full((6, 8), 70000, np.int64)
    ids[3:] = 2
    ids[1:5, 1:3] = 300
    ids[4:6, 5:8] = 5
    ids[0, 7] = ids[5, 0] = 0
    segments = [
        {"id": 70000, "category_id": 20, "iscrowd": 0, "bbox": [0, 0, 8, 3], "area": 19},
        {"id": 2, "category_id": 21, "iscrowd": 0, "bbox": [0, 3, 8, 3], "area": 9},
        {"id": 300, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 2, 4], "area": 8},
        {"id": 5, "category_id": 3, "iscrowd": 1, "bbox": [5, 4, 3, 2], "area": 6},
    ]
    return ids, segments


def test_records_and_metadata(tmp_path):
    ids, segments = _example()
    records, meta = _write(tmp_path, ids, segments)
    # things in id order are classes 0..K-1, stuff in id order semantic labels 1..S
    assert meta["thing_classes"] == ["person", "car"]
    assert meta["contiguous_id_to_dataset_id"] == [1, 3]
    assert meta["stuff_classes"] == ["things", "sky", "grass"]
    assert meta["stuff_dataset_ids"] == [20, 21]
    (r,) = records
    assert r["file_name"].endswith("a.jpg") and r["pan_seg_file_name"].endswith("a.png")
    assert (r["height"], r["width"], r["image_id"]) == (6, 8, 5)
    assert [(s["id"], s["isthing"], s["label"]) for s in r["segments_info"]] == [
        (70000, False, 1), (2, False, 2), (300, True, 0), (5, True, 1)]
    # the things as detection annotations (xyxy boxes, contiguous classes)
    assert [(a["bbox"], a["category_id"], a["iscrowd"]) for a in r["annotations"]] == [
        ([1.0, 1.0, 3.0, 5.0], 0, 0), ([5.0, 4.0, 8.0, 6.0], 1, 1)]


def test_png_round_trip_and_targets(tmp_path):
    ids, segments = _example()
    records, _ = _write(tmp_path, ids, segments)
    back = read_panoptic_png(records[0]["pan_seg_file_name"])
    np.testing.assert_array_equal(back, ids)
    sem, masks, labels = panoptic_targets(back, records[0]["segments_info"], source="a.png")
    want = np.array([[1, 1, 1, 1, 1, 1, 1, 255],
                     [1, 0, 0, 1, 1, 1, 1, 1],
                     [1, 0, 0, 1, 1, 1, 1, 1],
                     [2, 0, 0, 2, 2, 2, 2, 2],
                     [2, 0, 0, 2, 2, 0, 0, 0],
                     [255, 2, 2, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(sem, want)  # things 0 (the crowd too), stuff 1..S, void 255
    assert labels == [0]  # the crowd is no training instance
    np.testing.assert_array_equal(masks[0], ids == 300)


def test_mapper_train_and_eval(tmp_path):
    ids, segments = _example()
    records, _ = _write(tmp_path, ids, segments)
    flip = PanopticDatasetMapper(True, min_size_train=(), hflip_prob=1.0)
    out = flip(records[0], np.random.default_rng(0))
    inst = out["instances"]
    # flipped: the person's columns 1..2 become 5..6; its box is the mask's tight box
    assert inst["boxes"].tolist() == [[5.0, 1.0, 7.0, 5.0]]
    assert inst["labels"].tolist() == [0]
    assert inst["masks"].shape == (1, 6, 8) and int(inst["masks"].sum()) == 8
    assert inst["sem_seg"][0, 0] == 255 and inst["sem_seg"][4, 0] == 0
    big = PanopticDatasetMapper(True, min_size_train=(12,), max_size_train=100, hflip_prob=0.0)
    out = big(records[0], np.random.default_rng(0))
    assert out["image"].shape == (3, 12, 16) and out["instances"]["sem_seg"].shape == (12, 16)
    assert out["instances"]["boxes"].tolist() == [[2.0, 2.0, 6.0, 10.0]]
    assert set(out["instances"]["sem_seg"].unique().tolist()) == {0, 1, 2, 255}
    # an image of stuff only
    stuff_only = dict(records[0], segments_info=records[0]["segments_info"][:2])
    write_panoptic_png(stuff_only["pan_seg_file_name"], np.where(ids == 300, 2, ids) * (ids != 5))
    out = big(stuff_only, np.random.default_rng(0))["instances"]
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 12, 16)
    write_panoptic_png(stuff_only["pan_seg_file_name"], ids)
    ev = PanopticDatasetMapper(False)(records[0])
    assert ev["image"].shape == (3, 6, 8) and ev["segments_info"] == records[0]["segments_info"]
    assert ev["pan_seg_file_name"] == records[0]["pan_seg_file_name"]


def test_bad_png_ids_name_the_file(tmp_path):
    ids, segments = _example()
    bad = ids.copy()
    bad[0, 0] = 4242  # an id without a segment
    records, _ = _write(tmp_path, bad, segments, name="extra")
    with pytest.raises(PanopticFormatError, match=r"extra\.png.*\[4242\].*no segment in the json"):
        PanopticDatasetMapper(True, min_size_train=())(records[0], np.random.default_rng(0))
    # a segment of the json that the PNG lacks
    records, _ = _write(tmp_path, ids, segments + [
        {"id": 9, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1}], name="gone")
    with pytest.raises(PanopticFormatError, match=r"gone\.png: segments \[9\] .* no pixel"):
        PanopticDatasetMapper(True, min_size_train=())(records[0], np.random.default_rng(0))
    # an unknown category in the json names the json and the PNG
    with pytest.raises(Exception, match=r"pan\.json.*unknown\.png.*unknown category_id 99"):
        _write(tmp_path, ids, [dict(segments[0], category_id=99), *segments[1:]],
               name="unknown")


def test_panoptic_shapes_set(tmp_path):
    paths = ensure_panoptic_shapes(root=tmp_path, num_train=6, num_val=2, image_size=(64, 96))
    records, meta = load_coco_panoptic_json(paths.train_json, paths.train_images,
                                            paths.train_panoptic)
    assert meta["thing_classes"] == ["circle", "rectangle", "triangle", "cross"]
    assert meta["stuff_classes"] == ["things", "stripes", "checks", "speckle"]
    assert len(records) == 6
    stuff_counts = []
    for r in records:
        ids = read_panoptic_png(r["pan_seg_file_name"])
        sem, masks, _ = panoptic_targets(ids, r["segments_info"], source=r["pan_seg_file_name"])
        stuff = [s for s in r["segments_info"] if not s["isthing"]]
        stuff_counts.append(len(stuff))
        assert len({s["category_id"] for s in stuff}) == len(stuff)  # one segment per class
        assert (sem != 255).all()  # no void in the synthetic set
        for s in r["segments_info"]:
            assert int((ids == s["id"]).sum()) == s["area"]
    assert set(stuff_counts) <= {2, 3} and 3 in stuff_counts
    # regenerating the same version and parameters keeps the files
    assert ensure_panoptic_shapes(root=tmp_path, num_train=6, num_val=2,
                                  image_size=(64, 96)) == paths
