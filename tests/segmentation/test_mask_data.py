"""Instance masks from COCO annotations: polygons, RLE (compressed and not), crowd regions, and
bad input (degenerate polygons: counted skip; an RLE of another size: an error naming both)."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from detection.data.coco import load_coco_json
from detection.data.mapper import DatasetMapper, InvalidSegmentationError, annotation_to_mask

H, W = 30, 40


def _square() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[5:15, 10:30] = 1
    return m


def test_polygon_compressed_and_uncompressed_rle_agree():
    rle = mask_util.encode(np.asfortranarray(_square()))
    counts_str = dict(rle, counts=rle["counts"].decode())
    flat = _square().flatten(order="F")  # uncompressed RLE: run lengths, starting with zeros
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    uncompressed = {"size": [H, W], "counts": runs}
    for seg in (rle, counts_str, uncompressed):
        assert np.array_equal(annotation_to_mask(seg, H, W), _square())
    poly = [[10, 5, 30, 5, 30, 15, 10, 15]]
    assert annotation_to_mask(poly, H, W)[7:13, 12:28].all()


@pytest.mark.parametrize("poly", [[[1, 2, 3, 4]], [[1, 2, 3, 4, 5, 6, 7]], []])
def test_degenerate_polygon_names_the_annotation(poly):
    with pytest.raises(InvalidSegmentationError, match=r"annotation 17\b"):
        annotation_to_mask(poly, H, W, ann_id=17)


def test_rle_of_another_size_names_the_annotation_and_both_sizes():
    rle = mask_util.encode(np.asfortranarray(np.zeros((20, 40), np.uint8)))
    with pytest.raises(InvalidSegmentationError, match=r"annotation 5: RLE size \[20, 40\].*"
                                                       r"\(30, 40\)"):
        annotation_to_mask(rle, H, W, ann_id=5)


def _record(tmp_path, anns):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(tmp_path / "images" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    records, _ = load_coco_json(tmp_path / "a.json", tmp_path / "images")
    return records[0]


def _ann(i, seg, crowd=0):
    return {"id": i, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10],
            "iscrowd": crowd, "area": 200, "segmentation": seg}


def test_mapper_skips_degenerate_polygons_counts_them_and_drops_crowd(tmp_path):
    rle = mask_util.encode(np.asfortranarray(_square()))
    rle["counts"] = rle["counts"].decode()
    good_poly = [[10, 5, 30, 5, 30, 15, 10, 15]]
    record = _record(tmp_path, [_ann(1, rle), _ann(2, [[10, 5, 30, 5]]), _ann(3, rle, crowd=1),
                                _ann(4, good_poly)])
    mapper = DatasetMapper(True, min_size_train=(H,), max_size_train=100, hflip_prob=0.0,
                           mask_on=True)
    inst = mapper(record, np.random.default_rng(0))["instances"]
    assert inst["masks"].shape == (2, H, W)  # RLE and polygon; not the crowd nor the bad one
    assert inst["boxes"].shape == (2, 4)
    assert np.array_equal(inst["masks"][0].numpy(), _square())
    assert mapper.num_skipped_instances == 1


def test_mapper_refuses_rle_of_another_size(tmp_path):
    rle = mask_util.encode(np.asfortranarray(np.zeros((20, 40), np.uint8)))
    rle["counts"] = rle["counts"].decode()
    record = _record(tmp_path, [_ann(8, rle)])
    mapper = DatasetMapper(True, min_size_train=(H,), max_size_train=100, mask_on=True)
    with pytest.raises(InvalidSegmentationError, match="annotation 8"):
        mapper(record, np.random.default_rng(0))
