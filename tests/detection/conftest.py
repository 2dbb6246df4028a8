"""Fixtures for the data and evaluation tests: small COCO datasets written to tmp_path."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Non-contiguous on purpose: contiguous ids 0, 1, 2.
CATEGORIES = [
    {"id": 3, "name": "red_thing"},
    {"id": 7, "name": "green_thing"},
    {"id": 42, "name": "blue_thing"},
]


def write_coco(
    root: Path,
    images: list[dict],
    annotations: list[dict],
    categories: list[dict] | None = None,
    *,
    pixels: dict[int, np.ndarray] | None = None,
) -> Path:
    """Write ``root/ann.json`` and, for each image, a PNG (from ``pixels`` or plain grey)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for img in images:
        arr = (pixels or {}).get(img["id"])
        if arr is None:
            arr = np.full((img["height"], img["width"], 3), 128, np.uint8)
        Image.fromarray(arr).save(root / "images" / img["file_name"])
    path = root / "ann.json"
    data = {
        "images": images,
        "annotations": annotations,
        "categories": categories if categories is not None else CATEGORIES,
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_writer():
    """The :func:`write_coco` helper (fixtures, not imports: conftest names are not unique)."""
    return write_coco


@pytest.fixture
def small_coco(tmp_path):
    """3 images (one without annotations), 4 annotations over categories 3, 7, 42."""
    images = [
        {"id": 10, "file_name": "a.png", "height": 60, "width": 80},
        {"id": 11, "file_name": "b.png", "height": 90, "width": 50},
        {"id": 12, "file_name": "empty.png", "height": 40, "width": 40},
    ]
    anns = [
        {
            "id": 1,
            "image_id": 10,
            "category_id": 3,
            "bbox": [5, 5, 20, 10],
            "iscrowd": 0,
            "area": 200,
            "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]],
        },
        {
            "id": 2,
            "image_id": 10,
            "category_id": 42,
            "bbox": [30, 20, 10, 30],
            "iscrowd": 0,
            "area": 300,
            "segmentation": [[30, 20, 40, 20, 40, 50, 30, 50]],
        },
        {
            "id": 3,
            "image_id": 11,
            "category_id": 7,
            "bbox": [1, 2, 30, 40],
            "iscrowd": 0,
            "area": 1200,
            "segmentation": [[1, 2, 31, 2, 31, 42, 1, 42]],
        },
        {
            "id": 4,
            "image_id": 11,
            "category_id": 7,
            "bbox": [0, 50, 50, 40],
            "iscrowd": 1,
            "area": 2000,
            "segmentation": {"size": [90, 50], "counts": [50, 40] * 50},
        },  # rows 50..89, column-major
    ]
    json_path = write_coco(tmp_path, images, anns)
    return json_path, tmp_path / "images"
