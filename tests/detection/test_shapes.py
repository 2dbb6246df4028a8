import json

import numpy as np
from PIL import Image

from detection.data.coco import load_coco_json
from detection.data.mapper import annotation_to_mask
from detection.data.shapes import SHAPES_CLASSES, SHAPES_IGNORE_LABEL, ensure_shapes_dataset


def test_deterministic_and_cached(tmp_path):
    a = ensure_shapes_dataset(tmp_path / "a", num_train=12, num_val=4, seed=3)
    b = ensure_shapes_dataset(tmp_path / "b", num_train=12, num_val=4, seed=3)
    assert a.train_json.read_bytes() == b.train_json.read_bytes()
    assert a.val_json.read_bytes() == b.val_json.read_bytes()
    img = a.train_images / "000005.jpg"
    assert img.read_bytes() == (b.train_images / "000005.jpg").read_bytes()
    c = ensure_shapes_dataset(tmp_path / "a", num_train=12, num_val=4, seed=4)
    assert c.root != a.root and c.train_json.read_bytes() != a.train_json.read_bytes()
    # second call reuses the finished copy, leaves no temporary folders behind
    mtime = a.train_json.stat().st_mtime_ns
    again = ensure_shapes_dataset(tmp_path / "a", num_train=12, num_val=4, seed=3)
    assert again == a and a.train_json.stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_damaged_copy_is_regenerated(tmp_path):
    p = ensure_shapes_dataset(tmp_path, num_train=3, num_val=2)
    (p.root / "manifest.json").write_text('{"version": -1}')
    q = ensure_shapes_dataset(tmp_path, num_train=3, num_val=2)
    assert json.loads((q.root / "manifest.json").read_text())["version"] != -1


def test_masks_boxes_and_semantic_maps_agree(tmp_path):
    p = ensure_shapes_dataset(tmp_path, num_train=30, num_val=2, seed=0)
    records, meta = load_coco_json(p.train_json, p.train_images)
    assert meta["thing_classes"] == list(SHAPES_CLASSES)
    shapes = {(r["height"] > r["width"], r["height"] == r["width"]) for r in records}
    assert len(shapes) >= 2  # landscape and portrait both occur
    n = 0
    for r in records:
        img = np.asarray(Image.open(r["file_name"]))
        assert img.shape == (r["height"], r["width"], 3)
        sem = np.asarray(Image.open(p.train_sem_seg / (r["file_name"][-10:-4] + ".png")))
        assert sem.shape == img.shape[:2]
        for a in r["annotations"]:
            m = annotation_to_mask(a["segmentation"], r["height"], r["width"])
            ys, xs = np.nonzero(m)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.abs(np.array(box) - np.array(a["bbox"])).max() <= 1
            # the semantic map labels the mask's pixels with the class (or ignore at edges)
            vals = sem[m > 0]
            assert np.isin(vals, [a["category_id"] + 1, SHAPES_IGNORE_LABEL]).all()
            assert (vals == a["category_id"] + 1).mean() > 0.3
            n += 1
    assert n > 30
