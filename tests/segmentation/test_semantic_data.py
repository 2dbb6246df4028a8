"""Semantic label maps: PNG files with an ignore value, maps painted from COCO annotations,
augmentation that keeps labels on their pixels, and clear errors on bad label files."""

import numpy as np
import pytest
import torch
from PIL import Image

from detection.data import DatasetCatalog
from detection.data.shapes import ensure_shapes_dataset
from segmentation.semantic import SemanticDatasetMapper, read_label_map, sem_seg_from_coco


def _write_pair(tmp_path, label: np.ndarray, *, image_size=None, mode="L", name="a"):
    h, w = image_size or label.shape
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 200  # red where the label says class 1: a way to see labels follow pixels
    image = tmp_path / f"{name}.png"
    Image.fromarray(rgb).save(image)
    lbl = tmp_path / f"{name}_label.png"
    Image.fromarray(label, mode=mode).save(lbl) if mode != "P" else _save_palette(label, lbl)
    return {"file_name": str(image), "sem_seg_file_name": str(lbl), "height": h, "width": w,
            "image_id": 1}


def _save_palette(label: np.ndarray, path) -> None:
    img = Image.fromarray(label, mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def test_label_png_with_ignore_value_reads_back(tmp_path):
    label = np.zeros((6, 9), np.uint8)
    label[1:4, 2:5] = 2
    label[0, :] = 255  # ignore, as Cityscapes / ADE20K ship it
    record = _write_pair(tmp_path, label)
    out = SemanticDatasetMapper(False, num_classes=3)(record)
    assert out["sem_seg"].dtype == torch.int64
    assert torch.equal(out["sem_seg"], torch.from_numpy(label).long())
    assert out["image"].shape == (3, 6, 9) and out["image"].dtype == torch.uint8


def test_palette_label_png_gives_indices_not_colours(tmp_path):
    label = np.array([[0, 1], [2, 255]], np.uint8)
    record = _write_pair(tmp_path, label, mode="P")
    assert np.array_equal(read_label_map(record["sem_seg_file_name"]), label)


def test_label_size_differs_from_image_names_both_files(tmp_path):
    record = _write_pair(tmp_path, np.zeros((6, 9), np.uint8), image_size=(7, 9))
    with pytest.raises(ValueError) as e:
        SemanticDatasetMapper(True, num_classes=3)(record, np.random.default_rng(0))
    assert "a_label.png" in str(e.value) and "a.png" in str(e.value)
    assert "6x9" in str(e.value) and "7x9" in str(e.value)


def test_label_values_outside_the_classes_name_file_and_values(tmp_path):
    label = np.zeros((5, 5), np.uint8)
    label[0, 0], label[1, 1], label[2, 2] = 7, 255, 3
    record = _write_pair(tmp_path, label)
    with pytest.raises(ValueError, match=r"a_label\.png.*\[3, 7\]"):
        SemanticDatasetMapper(False, num_classes=3)(record)


def test_colour_label_png_is_refused(tmp_path):
    path = tmp_path / "rgb_label.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="rgb_label.png.*mode RGB"):
        read_label_map(path)


def test_augmentation_keeps_labels_on_their_pixels(tmp_path):
    label = np.zeros((40, 60), np.uint8)
    label[5:25, 10:30] = 1
    label[30:35, :] = 255
    record = _write_pair(tmp_path, label)
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[label == 1] = (200, 0, 0)
    Image.fromarray(rgb).save(record["file_name"])
    mapper = SemanticDatasetMapper(True, num_classes=2, min_size_train=(57, 80),
                                   max_size_train=200, hflip_prob=0.5, crop_size=(48, 64))
    for seed in range(6):
        out = mapper(record, np.random.default_rng(seed))
        img, sem = out["image"], out["sem_seg"]
        assert img.shape[1:] == sem.shape == (48, 64)
        assert set(sem.unique().tolist()) <= {0, 1, 255}  # nearest: no blended labels
        red = img[0].long()
        inside = red[sem == 1]
        outside = red[(sem == 0)]
        assert inside.float().mean() > 150 and outside.float().mean() < 50


def test_sem_seg_from_coco_paints_by_category(tmp_path):
    record = {
        "file_name": "x.jpg", "height": 8, "width": 10,
        "annotations": [
            {"category_id": 0, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
            {"category_id": 2, "iscrowd": 0, "segmentation": [[3, 3, 8, 3, 8, 7, 3, 7]]},
            {"category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [8, 10], "counts": [0, 8, 72]}},
        ],
    }
    sem = sem_seg_from_coco(record, num_classes=4)
    assert sem.shape == (8, 10) and sem.dtype == np.uint8
    assert sem[2, 2] == 1  # class 0 -> label 1
    assert sem[5, 6] == 3  # class 2 -> label 3, painted over the first
    assert sem[7, 9] == 0  # background
    assert sem[0, 0] == 255  # the crowd region (first column) where nothing else is
    with pytest.raises(ValueError, match="does not fit 3 classes"):
        sem_seg_from_coco(record, num_classes=3)


def test_coco_records_without_label_files_get_painted_maps(tmp_path):
    paths = ensure_shapes_dataset(root=tmp_path, num_train=3, num_val=1, image_size=(64, 96))
    name = f"{paths.train_json}:{paths.train_images}"
    records = DatasetCatalog.get(name)
    mapper = SemanticDatasetMapper(False, num_classes=5)
    for r in records:
        assert "sem_seg_file_name" not in r
        painted = mapper(r)["sem_seg"]
        stem = r["file_name"].rsplit("/", 1)[1].replace(".jpg", ".png")
        shipped = torch.from_numpy(read_label_map(paths.train_sem_seg / stem)).long()
        agree = (painted == shipped) | (shipped == 255)
        assert bool(agree.all())  # the shipped maps only add the ignored boundary band



def test_sem_seg_from_coco_skips_degenerate_polygons_and_refuses_wrong_rle():
    square = [[2, 2, 8, 2, 8, 8, 2, 8]]
    record = {"file_name": "x.jpg", "height": 12, "width": 12, "annotations": [
        {"id": 1, "category_id": 0, "segmentation": square, "iscrowd": 0},
        {"id": 2, "category_id": 1, "segmentation": [[1, 1, 5, 5]], "iscrowd": 0},  # 2 points
    ]}
    sem = sem_seg_from_coco(record, num_classes=3)
    assert set(np.unique(sem).tolist()) == {0, 1}  # the degenerate instance painted nothing
    record["annotations"].append({"id": 3, "category_id": 1, "iscrowd": 0,
                                  "segmentation": {"size": [10, 12], "counts": [120]}})
    with pytest.raises(ValueError, match=r"annotation 3: RLE size \[10, 12\]"):
        sem_seg_from_coco(record, num_classes=3)
