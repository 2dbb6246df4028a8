"""The panoptic shapes set: detection's synthetic shapes as things, on a background split into
two or three stuff regions of distinct textures, written as a real COCO panoptic dataset.

Each image (160-256 px per side) is cut by parallel straight lines at a random angle into two
or three bands, each of a different stuff class (``stripes``: a sinusoidal grating; ``checks``:
a checkerboard; ``speckle``: strong pixel noise), in a random base colour. On top, 0-5 filled
shapes of detection's four classes (circle, rectangle, triangle, cross), drawn as
:mod:`detection.data.shapes` draws them (a shape never hides more than half of an earlier one).
Files per split::

    <root>/panoptic_<split>.json     COCO panoptic json: images, annotations (file_name,
                                     segments_info with id, category_id, iscrowd 0, bbox xywh,
                                     area), categories (things 1-4, stuff 11-13)
    <root>/<split>/000001.jpg        the images (JPEG, quality 95)
    <root>/panoptic_<split>/000001.png   segment ids, R + 256 G + 256^2 B

Segment ids are ``category_id * 1000 + k``, so they use two colour channels. Generation is
deterministic in the seed, atomic (a temporary folder renamed) and versioned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detection.data.shapes import (
    SHAPES_CATEGORY_IDS,
    SHAPES_CLASSES,
    default_shapes_root,
    generated_once,
    paint_shapes,
)

from .format import id2rgb

__all__ = [
    "PANOPTIC_SHAPES_VERSION",
    "STUFF_CATEGORY_IDS",
    "STUFF_CLASSES",
    "PanopticShapesPaths",
    "ensure_panoptic_shapes",
    "generate_panoptic_split",
]

PANOPTIC_SHAPES_VERSION = 1
STUFF_CLASSES = ("stripes", "checks", "speckle")
STUFF_CATEGORY_IDS = (11, 12, 13)
_SPLIT_KEYS = {"train": 1, "val": 2}


@dataclass(frozen=True)
class PanopticShapesPaths:
    root: Path
    train_json: Path
    train_images: Path
    train_panoptic: Path
    val_json: Path
    val_images: Path
    val_panoptic: Path


def _bands(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """(h, w) band index 0..k-1: k bands between parallel lines at a random angle, none under
    about a fifth of the image."""
    angle = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    qs = np.sort(rng.uniform(0.2, 0.8, size=k - 1))
    if k == 3:
        qs = np.array([rng.uniform(0.2, 0.4), rng.uniform(0.6, 0.8)])
    cuts = np.quantile(t, qs)
    return np.searchsorted(cuts, t).astype(np.int64)


def _texture(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 texture of stuff class ``cls`` in a random base colour."""
    base = rng.uniform(50, 200, size=3).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    amp = rng.uniform(30, 50)
    if cls == 0:  # stripes
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 10)
        v = np.sin(2 * np.pi * (xs * np.cos(a) + ys * np.sin(a)) / period)
    elif cls == 1:  # checks
        cell = int(rng.integers(6, 11))
        v = ((xs // cell + ys // cell) % 2) * 2.0 - 1.0
    else:  # speckle
        v = rng.normal(0, 1, size=(h, w)).clip(-2, 2)
    noise = rng.normal(0, 4, size=(h, w, 1))
    return (base[None, None] + amp * v[..., None] + noise).astype(np.float32)


def _make_image(rng: np.random.Generator, sizes: tuple[int, int]):
    """-> image (h, w, 3) uint8, segment ids (h, w) int64, segments_info."""
    lo, hi = sizes
    h = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    w = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    k = int(rng.integers(2, 4))
    classes = rng.permutation(len(STUFF_CLASSES))[:k]
    bands = _bands(rng, h, w, k)
    img = np.zeros((h, w, 3), np.float32)
    for b, c in enumerate(classes):
        tex = _texture(rng, int(c), h, w)
        img[bands == b] = tex[bands == b]
    visible, shape_classes = paint_shapes(rng, img)
    ids = np.zeros((h, w), np.int64)
    segments = []
    for b, c in enumerate(classes):
        cat = STUFF_CATEGORY_IDS[int(c)]
        ids[bands == b] = cat * 1000 + 1
    count: dict[int, int] = {}
    for v, c in zip(visible, shape_classes):
        if v.sum() < 20:
            continue
        cat = SHAPES_CATEGORY_IDS[c]
        count[cat] = count.get(cat, 0) + 1
        ids[v] = cat * 1000 + count[cat]
    for seg_id in np.unique(ids).tolist():
        m = ids == seg_id
        ys, xs = np.nonzero(m)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append({"id": seg_id, "category_id": seg_id // 1000, "iscrowd": 0,
                         "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                         "area": int(m.sum())})
    return np.clip(img, 0, 255).astype(np.uint8), ids, segments


def _categories() -> list[dict]:
    return ([{"id": i, "name": n, "isthing": 1, "supercategory": "shape"}
             for i, n in zip(SHAPES_CATEGORY_IDS, SHAPES_CLASSES)]
            + [{"id": i, "name": n, "isthing": 0, "supercategory": "texture"}
               for i, n in zip(STUFF_CATEGORY_IDS, STUFF_CLASSES)])


def generate_panoptic_split(out_dir: str | os.PathLike, split: str, num_images: int, *,
                            image_size: tuple[int, int] = (160, 256), seed: int = 0) -> Path:
    """Write one split (json, images, PNGs) under ``out_dir``; return the json path."""
    out = Path(out_dir)
    img_dir, pan_dir = out / split, out / f"panoptic_{split}"
    img_dir.mkdir(parents=True, exist_ok=True)
    pan_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = i + 1
        rng = np.random.default_rng([seed, _SPLIT_KEYS.get(split, 9), i, 7])
        img, ids, segments = _make_image(rng, image_size)
        h, w = ids.shape
        Image.fromarray(img).save(img_dir / f"{image_id:06d}.jpg", quality=95)
        Image.fromarray(id2rgb(ids)).save(pan_dir / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "height": h,
                       "width": w})
        annotations.append({"image_id": image_id, "file_name": f"{image_id:06d}.png",
                            "segments_info": segments})
    data = {"info": {"description": "detkit panoptic shapes",
                     "version": PANOPTIC_SHAPES_VERSION},
            "images": images, "annotations": annotations, "categories": _categories()}
    path = out / f"panoptic_{split}.json"
    path.write_text(json.dumps(data, separators=(",", ":")))
    return path


def _paths(root: Path) -> PanopticShapesPaths:
    return PanopticShapesPaths(
        root=root, train_json=root / "panoptic_train.json", train_images=root / "train",
        train_panoptic=root / "panoptic_train", val_json=root / "panoptic_val.json",
        val_images=root / "val", val_panoptic=root / "panoptic_val")


def ensure_panoptic_shapes(root: str | os.PathLike | None = None, num_train: int = 1500,
                           num_val: int = 250, image_size: tuple[int, int] = (160, 256),
                           seed: int = 0) -> PanopticShapesPaths:
    """Generate the set under ``root`` (default: ``panoptic/`` inside detection's shapes cache)
    unless a complete copy of this version and these parameters is there."""
    base = Path(root).expanduser() if root is not None else default_shapes_root() / "panoptic"
    lo, hi = image_size
    manifest = {"version": PANOPTIC_SHAPES_VERSION, "seed": seed, "num_train": num_train,
                "num_val": num_val, "image_size": [lo, hi]}

    def generate(tmp: Path) -> None:
        generate_panoptic_split(tmp, "train", num_train, image_size=image_size, seed=seed)
        generate_panoptic_split(tmp, "val", num_val, image_size=image_size, seed=seed)

    return _paths(generated_once(base / (f"v{PANOPTIC_SHAPES_VERSION}_seed{seed}"
                                         f"_{num_train}x{num_val}_{lo}-{hi}px"),
                                 manifest, generate))
