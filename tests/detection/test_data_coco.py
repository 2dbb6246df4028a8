import json
import logging

import pytest

from detection.data.catalog import DatasetCatalog, get_metadata, register_coco_instances
from detection.data.coco import CocoFormatError, filter_images_without_annotations, load_coco_json


def test_non_contiguous_ids_and_empty_images(small_coco):
    json_path, image_root = small_coco
    records, meta = load_coco_json(json_path, image_root, "tiny")
    assert meta["thing_classes"] == ["red_thing", "green_thing", "blue_thing"]
    assert meta["thing_dataset_id_to_contiguous_id"] == {3: 0, 7: 1, 42: 2}
    assert meta["contiguous_id_to_dataset_id"] == [3, 7, 42]
    by_id = {r["image_id"]: r for r in records}
    assert set(by_id) == {10, 11, 12}
    assert by_id[12]["annotations"] == []  # kept for evaluation
    a = by_id[10]["annotations"]
    assert [x["category_id"] for x in a] == [0, 2]
    assert a[0]["bbox"] == [5.0, 5.0, 25.0, 15.0]  # xywh -> xyxy
    assert a[1]["segmentation"] == [[30, 20, 40, 20, 40, 50, 30, 50]]
    assert by_id[11]["annotations"][1]["iscrowd"] == 1
    assert by_id[10]["file_name"] == str(image_root / "a.png")
    assert (by_id[10]["height"], by_id[10]["width"]) == (60, 80)
    # and back: contiguous -> dataset id
    back = [meta["contiguous_id_to_dataset_id"][x["category_id"]] for x in a]
    assert back == [3, 42]
    kept = filter_images_without_annotations(records)
    assert {r["image_id"] for r in kept} == {10, 11}


def test_catalog_registration(small_coco):
    json_path, image_root = small_coco
    register_coco_instances("tiny_test_set", json_path, image_root)
    try:
        meta = get_metadata("tiny_test_set")
        assert meta["contiguous_id_to_dataset_id"] == [3, 7, 42]
        assert len(DatasetCatalog.get("tiny_test_set")) == 3
        with pytest.raises(KeyError, match="tiny_test_set"):
            DatasetCatalog.get("tiny_test_sett")
    finally:
        DatasetCatalog.remove("tiny_test_set")
    assert {"coco_2017_train", "coco_2017_val", "coco_2017_test-dev", "shapes_train"} <= set(
        DatasetCatalog.list()
    )


CATEGORY_NAMES = ["red_thing", "green_thing", "blue_thing"]


@pytest.fixture
def one_image(tmp_path, coco_writer):
    def make(anns):
        images = [{"id": 1, "file_name": "x.png", "height": 50, "width": 100}]
        return coco_writer(tmp_path, images, anns)

    return make


def _ann(i, bbox, cat=3, **kw):
    return {"id": i, "image_id": 1, "category_id": cat, "bbox": bbox, "iscrowd": 0, **kw}


def test_degenerate_boxes_skipped_and_counted(tmp_path, one_image, caplog):
    path = one_image(
        [_ann(1, [10, 10, 0, 5]), _ann(2, [10, 10, 5, -3]), _ann(3, [1, 1, 5, 5])],
    )
    with caplog.at_level(logging.WARNING):
        records, meta = load_coco_json(path, tmp_path / "images")
    assert [a["id"] for a in records[0]["annotations"]] == [3]
    assert meta["load_stats"]["degenerate_box"] == 2
    assert "2 annotation(s) skipped (degenerate_box)" in caplog.text


def test_boxes_outside_image(tmp_path, one_image):
    path = one_image(
        [_ann(1, [-10, 40, 30, 20]), _ann(2, [200, 10, 5, 5]), _ann(3, [10, -30, 5, 10])],
    )
    records, meta = load_coco_json(path, tmp_path / "images")
    anns = records[0]["annotations"]
    assert [a["id"] for a in anns] == [1]
    assert anns[0]["bbox"] == [0.0, 40.0, 20.0, 50.0]  # clipped to the 100x50 image
    assert meta["load_stats"]["clipped"] == 1
    assert meta["load_stats"]["outside_image"] == 2


def test_unknown_category(tmp_path, one_image):
    path = one_image([_ann(1, [1, 1, 5, 5], cat=99), _ann(2, [1, 1, 5, 5], cat=7)])
    records, meta = load_coco_json(path, tmp_path / "images")
    assert [a["id"] for a in records[0]["annotations"]] == [2]
    assert meta["load_stats"]["unknown_category"] == 1
    with pytest.raises(CocoFormatError, match="annotation id 1 .*category_id 99"):
        load_coco_json(path, tmp_path / "images", unknown_category="error")


def test_empty_annotation_list(tmp_path, one_image):
    path = one_image([])
    records, meta = load_coco_json(path, tmp_path / "images")
    assert len(records) == 1 and records[0]["annotations"] == []
    assert meta["thing_classes"] == CATEGORY_NAMES
    assert filter_images_without_annotations(records) == []


def test_malformed_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [{"id": 1,}]}')
    with pytest.raises(CocoFormatError) as e:
        load_coco_json(path, tmp_path)
    assert str(path) in str(e.value) and "line 1 column" in str(e.value)
    other = tmp_path / "list.json"
    other.write_text(json.dumps([1, 2]))
    with pytest.raises(CocoFormatError, match="list.json"):
        load_coco_json(other, tmp_path)


def test_records_are_built_in_the_memory_of_the_json_they_come_from(tmp_path):
    """Loading drops each json entry once its record is built, so the records take the place
    of the parsed json instead of adding to it: traced memory while loading stays within a
    few percent of the parsed json's (holding both, it rises by half of it). The records
    equal those of a json loaded without the hand-over from a kept parse."""
    import random
    import tracemalloc

    from detection.data.coco import read_coco_json

    rng = random.Random(0)
    images, anns = [], []
    for i in range(1500):
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": 480, "width": 640})
        for j in range(6):
            x, y = round(rng.uniform(0, 500), 2), round(rng.uniform(0, 300), 2)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + j % 3,
                         "bbox": [x, y, 40.5, 30.25], "area": 1000.0, "iscrowd": 0,
                         "segmentation": [[round(rng.uniform(0, 600), 2) for _ in range(8)]]})
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": k, "name": f"c{k}"} for k in (1, 2, 3)]}))
    del images, anns
    want, _ = load_coco_json(path, tmp_path)

    tracemalloc.start()
    try:
        kept = read_coco_json(path, keep=True)
        parsed = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        got, _ = load_coco_json(path, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == want
    assert peak - parsed < 0.1 * parsed, (peak - parsed, parsed)
    assert "annotations" not in kept and "images" not in kept  # consumed, as documented
