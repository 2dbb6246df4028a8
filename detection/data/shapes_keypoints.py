"""A synthetic keypoint dataset: quadrilaterals whose four corners are keypoints, in COCO's
person-keypoints format, generated once into a cache (the sibling of :mod:`detection.data.shapes`).

Each image (160-256 px per side) has the shapes set's textured background, 0-2 unannotated
distractors (circles, crosses) and 1-4 filled quadrilaterals, each in its own colour (none in 5%
of the images), of one category, ``quad``: near-rectangles with jittered corners, turned by at
most 20 degrees, so that "left" and "top" stay well defined and a horizontal flip maps a quad
onto a quad with its left and right corners exchanged. A later quad hides at most 40% of an
earlier one; quads may reach past the image border.

Keypoints ``left_top, right_top, right_bottom, left_bottom`` (the ``left_``/``right_`` names
give the flip pairs, as COCO's person names do) sit on the corner pixels' centres (``x + 0.5``,
the continuous coordinates the mapper flips as ``w - x``); visibility 2 where the corner pixel
belongs to the quad's visible part, 1 where a later quad covers it, 0 (with x = y = 0) where
it lies outside the image. Boxes are the whole quad's extent clipped to the image (so that a
covered corner lies in its box), masks (RLE) and ``area`` its visible part. Files per split::

    <root>/<split>.json          COCO json: ``keypoints``, ``num_keypoints``, the category's
                                 ``keypoints`` names and ``skeleton`` (1-based)
    <root>/<split>/000001.jpg    the images (JPEG, quality 95)

Deterministic in the seed (each image from its own ``(seed, split, index)`` generator), written
atomically (a temporary folder renamed) and versioned by the folder name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from detection.data.shapes import (
    _COLOURS,
    _background,
    _shape_mask,
    default_shapes_root,
    generated_once,
)

__all__ = [
    "KEYPOINT_NAMES",
    "KEYPOINT_OKS_SIGMAS",
    "KEYPOINT_SKELETON",
    "SHAPES_KEYPOINTS_VERSION",
    "ShapesKeypointsPaths",
    "ensure_shapes_keypoints_dataset",
    "generate_keypoint_split",
]

SHAPES_KEYPOINTS_VERSION = 1
CATEGORY = {"id": 1, "name": "quad", "supercategory": "shape"}
KEYPOINT_NAMES = ("left_top", "right_top", "right_bottom", "left_bottom")
KEYPOINT_SKELETON = ((1, 2), (2, 3), (3, 4), (4, 1))  # 1-based, as COCO's json
# OKS sigmas per corner (COCO's person sigmas run 0.025-0.107); a sharp corner is well defined
KEYPOINT_OKS_SIGMAS = (0.05, 0.05, 0.05, 0.05)

_SPLIT_KEYS = {"train": 1, "val": 2}
_MAX_HIDDEN = 0.4  # of an earlier quad's visible area


@dataclass(frozen=True)
class ShapesKeypointsPaths:
    """Where one generated version of the keypoint shapes dataset lives."""

    root: Path
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path


def quad_corners(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random quad's corners ``(4, 2)`` int64 (x, y pixel indices) in the order of
    :data:`KEYPOINT_NAMES`; its centre lies in the image, its corners may not."""
    size = rng.uniform(0.25, 0.55) * min(h, w)
    aspect = rng.uniform(0.6, 1.6)
    hw, hh = size / 2 * np.sqrt(aspect), size / 2 / np.sqrt(aspect)
    base = np.array([(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)])
    base += rng.uniform(-0.25, 0.25, size=(4, 2)) * min(hw, hh)
    t = rng.uniform(-np.pi / 9, np.pi / 9)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = np.array([rng.uniform(0.12, 0.88) * w, rng.uniform(0.12, 0.88) * h])
    return np.rint(base @ rot.T + centre).astype(np.int64)


def _polygon_mask(corners: np.ndarray, h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(int(x), int(y)) for x, y in corners], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def _make_image(rng: np.random.Generator, sizes: tuple[int, int]):
    """-> image (h, w, 3) uint8 and, per quad, (corners (4, 2), whole mask, visible mask)."""
    lo, hi = sizes
    h = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    w = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    img = _background(rng, h, w)
    for _ in range(int(rng.integers(0, 3))):  # distractors, under the quads
        m = _shape_mask(rng, int(rng.choice([0, 3])), h, w)
        img[m] = _COLOURS[int(rng.integers(0, len(_COLOURS)))][None, :]
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, 5))
    quads: list[tuple[np.ndarray, np.ndarray]] = []
    visible: list[np.ndarray] = []
    colours = list(rng.permutation(len(_COLOURS)))  # a colour per quad: edges stay visible
    for _ in range(n):
        for _attempt in range(10):
            corners = quad_corners(rng, h, w)
            whole = _polygon_mask(corners, h, w)
            if whole.sum() < 150:
                continue
            if all((v & whole).sum() <= _MAX_HIDDEN * v.sum() for v in visible):
                break
        else:
            continue
        visible = [v & ~whole for v in visible]
        visible.append(whole)
        quads.append((corners, whole))
        colour = _COLOURS[int(colours.pop())]
        shade = rng.normal(0, 6, size=(int(whole.sum()), 1)).astype(np.float32)
        img[whole] = colour[None, :] + shade
    out = [(c, m, v) for (c, m), v in zip(quads, visible)]
    return np.clip(img, 0, 255).astype(np.uint8), out


def corner_keypoints(corners: np.ndarray, visible: np.ndarray) -> list[float]:
    """COCO's flat ``[x, y, v] * 4`` of a quad's ``corners`` given its visible mask."""
    h, w = visible.shape
    out: list[float] = []
    for x, y in corners:
        if not (0 <= x < w and 0 <= y < h):
            out += [0.0, 0.0, 0.0]
        else:
            out += [float(x) + 0.5, float(y) + 0.5, 2.0 if visible[y, x] else 1.0]
    return out


def generate_keypoint_split(
    out_dir: str | os.PathLike,
    split: str,
    num_images: int,
    *,
    image_size: tuple[int, int] = (160, 256),
    seed: int = 0,
) -> Path:
    """Write one split (json and images) under ``out_dir``; return the json path."""
    out = Path(out_dir)
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = i + 1
        rng = np.random.default_rng([seed, 100 + _SPLIT_KEYS.get(split, 9), i])
        img, quads = _make_image(rng, image_size)
        h, w = img.shape[:2]
        name = f"{image_id:06d}.jpg"
        Image.fromarray(img).save(img_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for corners, whole, vis in quads:
            if vis.sum() < 20:
                continue
            ys, xs = np.nonzero(whole)
            x0, y0 = int(xs.min()), int(ys.min())
            rle = mask_util.encode(np.asfortranarray(vis.astype(np.uint8)))
            kps = corner_keypoints(corners, vis)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": CATEGORY["id"],
                "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                "area": int(vis.sum()),
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "keypoints": kps,
                "num_keypoints": sum(1 for v in kps[2::3] if v > 0),
            })
    data = {
        "info": {"description": "detkit synthetic keypoint shapes",
                 "version": SHAPES_KEYPOINTS_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [dict(CATEGORY, keypoints=list(KEYPOINT_NAMES),
                            skeleton=[list(p) for p in KEYPOINT_SKELETON])],
    }
    json_path = out / f"{split}.json"
    json_path.write_text(json.dumps(data, separators=(",", ":")))
    return json_path


def _paths(root: Path) -> ShapesKeypointsPaths:
    return ShapesKeypointsPaths(root=root, train_json=root / "train.json",
                                train_images=root / "train", val_json=root / "val.json",
                                val_images=root / "val")


def ensure_shapes_keypoints_dataset(
    root: str | os.PathLike | None = None,
    num_train: int = 1200,
    num_val: int = 200,
    image_size: tuple[int, int] = (160, 256),
    seed: int = 0,
) -> ShapesKeypointsPaths:
    """Generate the dataset under ``root`` (default: the shapes cache,
    :func:`~detection.data.shapes.default_shapes_root`) unless present, into
    ``root/keypoints_v<version>_seed<seed>_<num_train>x<num_val>_<lo>-<hi>px``; a
    ``manifest.json`` written last records the version and parameters."""
    base = Path(root).expanduser() if root is not None else default_shapes_root()
    lo, hi = image_size
    manifest = {"version": SHAPES_KEYPOINTS_VERSION, "seed": seed, "num_train": num_train,
                "num_val": num_val, "image_size": [lo, hi]}

    def generate(tmp: Path) -> None:
        generate_keypoint_split(tmp, "train", num_train, image_size=image_size, seed=seed)
        generate_keypoint_split(tmp, "val", num_val, image_size=image_size, seed=seed)

    return _paths(generated_once(base / (f"keypoints_v{SHAPES_KEYPOINTS_VERSION}_seed{seed}"
                                         f"_{num_train}x{num_val}_{lo}-{hi}px"),
                                 manifest, generate))
