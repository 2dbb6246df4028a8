"""Fuzzed inputs: random json structures, boxes, polygons and RLEs into the COCO loader, the
mapper and the data check. Each input is loaded, or refused with the data package's own error
naming the field; never a bare KeyError/IndexError/TypeError from inside. Fixed seed, bounded
examples."""

import json
import re
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_util

from detection.data.annotations import annotation_to_mask
from detection.data.check import check_records
from detection.data.coco import CocoFormatError, load_coco_json
from detection.data.errors import DatasetError
from detection.data.image_io import ImageReadError
from detection.data.mapper import DatasetMapper

H, W = 24, 32
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools, numpy 2
FUZZ = settings(derandomize=True, max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# what a refusal must name: the entry and the field, or the top-level key
FIELD = re.compile(r"images\[|annotations\[|categories\[|'images'|'annotations'|"
                   r"'categories'|[Dd]uplicate|width/height|category_id|field '")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 100) | st.floats(allow_nan=True)
    | st.text(string.printable, max_size=4),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text("abc", max_size=2), c,
                                                        max_size=3),
    max_leaves=6)
coords = st.integers(-3, W + 3) | st.floats(-3.0, W + 3.0)


def one_in(n: int, rare, common):
    """``rare`` once in ``n`` draws, else ``common`` (one_of would not weight repeats)."""
    return st.integers(0, n - 1).flatmap(lambda k: rare if k == 0 else common)


numbers = one_in(40, st.floats(allow_nan=True), coords)  # now and then nan, inf, 1e308


def maybe(strategy):
    """Mostly the well-formed value, sometimes anything at all."""
    return one_in(6, json_values, strategy)


polygons = st.lists(  # x, y pairs; now and then a number dropped (odd, or under 3 points)
    st.tuples(st.lists(st.tuples(numbers, numbers), min_size=3, max_size=6), st.integers(0, 7))
    .map(lambda t: [v for xy in t[0] for v in xy][: None if t[1] else -1]),
    min_size=0, max_size=2)


@st.composite
def rles(draw):
    kind = draw(st.sampled_from(["list", "list", "string", "string", "mutated", "garbage"]))
    size = draw(st.sampled_from([[H, W]] * 6 + [[W, H], [H], "x", [H + 1, W]]))
    if kind == "list":
        counts = draw(st.lists(st.integers(-2, H * W // 3), max_size=6))
        if draw(st.integers(0, 3)):  # mostly a valid cover of the image
            counts = [abs(c) for c in counts] + [H * W - sum(abs(c) for c in counts)]
        return {"size": size, "counts": counts}
    mask = np.asfortranarray(draw(st.integers(0, 2**31)) % 7 == np.arange(H * W).reshape(H, W)
                             % 7).astype(np.uint8)
    counts = mask_util.encode(mask)["counts"].decode()
    if kind == "mutated" and counts:
        k = draw(st.integers(0, len(counts) - 1))
        counts = counts[:k] + draw(st.characters(min_codepoint=32, max_codepoint=130)) + \
            counts[k + 1:]
    if kind == "garbage":
        counts = draw(json_values)
    return {"size": size, "counts": counts}


segmentations = st.one_of(polygons, polygons, rles(), json_values)
boxes = one_in(4, st.lists(numbers, min_size=4, max_size=4),  # xywh
               st.tuples(coords, coords, st.floats(0, 20), st.floats(0, 20)).map(list))


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


@st.composite
def mutated(draw, base):
    """``base`` with 0-2 values replaced by any json value, or deleted."""
    data = draw(base)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        if not path:
            return draw(json_values)
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return data


@st.composite
def well_formed_coco(draw):
    images = [{"id": i, "file_name": draw(st.sampled_from(["a.png", "b.png", "gone.png"])),
               "height": H, "width": W} for i in range(1, draw(st.integers(1, 3)) + 1)]
    anns = [{"id": i, "image_id": draw(st.integers(1, 4)),
             "category_id": draw(st.sampled_from([1, 2, 2, 9])),
             "bbox": draw(boxes),
             "iscrowd": draw(st.sampled_from([0, 0, 0, 1])),
             "area": draw(st.floats(0, 100)),
             "segmentation": draw(segmentations)} for i in range(draw(st.integers(0, 4)))]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]}


coco_json = mutated(well_formed_coco())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(d / "images" / "a.png")
    Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(d / "images" / "b.png")
    return d


MAPPERS = [DatasetMapper(True, min_size_train=(16, 24), max_size_train=48, mask_on=True),
           DatasetMapper(True, min_size_train=(16,), max_size_train=48, skip_missing_images=True),
           DatasetMapper(False)]


@FUZZ
@given(data=coco_json)
def test_loader_mapper_and_check_take_random_json(root, data):
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    try:
        records, meta = load_coco_json(path, root / "images")
    except CocoFormatError as e:
        assert str(path) in str(e) and FIELD.search(str(e)), str(e)
        event("json refused")
        return
    event(f"json loaded, {sum(len(r['annotations']) for r in records) > 0} annotations kept")
    assert all(isinstance(r["image_id"], int) for r in records)
    for rec in records:
        for a in rec["annotations"]:  # what the loader keeps is well-formed
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= rec["width"] and 0 <= y0 < y1 <= rec["height"]
            assert a["category_id"] in (0, 1) and a["iscrowd"] in (0, 1)
    report = check_records(records, mode="full", mask_on=True, progress=False, workers=1)
    usable = report.apply(records)
    for rec in records:
        for mapper in MAPPERS:
            try:
                out = mapper(rec, np.random.default_rng(0))
            except ImageReadError as e:  # missing file: named
                assert rec["file_name"] in str(e)
                continue
            except DatasetError as e:
                assert re.search(r"image_id|annotation|field", str(e)), str(e)
                event(f"mapper refused: {type(e).__name__}")
                continue
            event("mapper mapped" if out is not None else "mapper skipped")
            if out is None:
                assert mapper.skip_missing_images
                continue
            assert out["image"].dtype.is_floating_point is False and out["image"].shape[0] == 3
            if "instances" in out:
                n = len(out["instances"]["boxes"])
                assert out["instances"]["labels"].shape == (n,)
    for rec in usable:  # after the check, the mask mapper takes every usable record
        out = MAPPERS[0](rec, np.random.default_rng(1))
        assert out is not None and out["instances"]["masks"].shape[0] == \
            len(out["instances"]["boxes"])


records_direct = st.fixed_dictionaries({
    "file_name": st.just("a.png"), "height": st.just(H), "width": st.just(W),
    "image_id": st.integers(0, 9),
    "annotations": maybe(st.lists(maybe(st.fixed_dictionaries({
        "id": st.integers(0, 9),
        "bbox": maybe(boxes),
        "category_id": maybe(st.integers(-1, 3)),
        "segmentation": segmentations,
    }).map(lambda a: a if a["id"] else {k: v for k, v in a.items() if k != "segmentation"})),
        max_size=4)),
})


@FUZZ
@given(record=records_direct)
def test_mapper_takes_random_records(root, record):
    record = dict(record, file_name=str(root / "images" / "a.png"))
    for mapper in MAPPERS:
        try:
            out = mapper(record, np.random.default_rng(0))
        except DatasetError as e:
            assert re.search(r"annotation|field", str(e)), str(e)
            continue
        assert out["height"] == H and out["width"] == W
    report = check_records([record], mode="full", mask_on=True, progress=False, workers=1)
    (fixed,) = report.apply([record])
    MAPPERS[0](fixed, np.random.default_rng(0))  # the check drops what the mask mapper refuses


@FUZZ
@given(seg=segmentations, hw=st.sampled_from([(H, W), (H, W), (H, W), (1, 1), (5, 3)]))
def test_segmentation_is_a_mask_or_refused(seg, hw):
    h, w = hw
    try:
        mask = annotation_to_mask(seg, h, w, ann_id=7)
    except DatasetError as e:
        assert "annotation 7" in str(e)
        event("segmentation refused")
        return
    event("segmentation decoded")
    assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    if isinstance(seg, dict) and isinstance(seg["counts"], str):  # same as pycocotools
        ref = mask_util.decode({"size": [h, w], "counts": seg["counts"].encode()})
        assert np.array_equal(mask, ref)
