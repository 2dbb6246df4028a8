"""A small synthetic dataset of drawn shapes, in COCO format, generated once into a cache.

Each image (160-256 px per side, both orientations) has a textured, noisy background and 0-5
filled shapes of 4 classes (circle, rectangle, triangle, cross) in random colours and sizes,
some overlapping (a shape never hides more than half of an earlier one). About 5 % of the images
have no shapes. Files written per split::

    <root>/<split>.json              COCO instances json; masks are RLE of the visible part,
                                     boxes are the visible mask's bounding box (xywh)
    <root>/<split>/000001.jpg        the images (JPEG, quality 95)
    <root>/<split>_sem/000001.png    semantic label maps: 0 background, 1..4 the classes,
                                     255 (ignore) on a 1-pixel band at shape boundaries

Generation is deterministic in the seed (each image from its own ``(seed, split, index)``
generator), atomic (written to a temporary folder and renamed) and versioned: the folder name
carries ``SHAPES_VERSION`` and the parameters, so a new version regenerates.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_IGNORE_LABEL",
    "SHAPES_VERSION",
    "ShapesPaths",
    "default_shapes_root",
    "ensure_shapes_dataset",
    "generate_split",
    "generated_once",
]

SHAPES_VERSION = 1
SHAPES_CLASSES = ("circle", "rectangle", "triangle", "cross")
SHAPES_CATEGORY_IDS = (1, 2, 3, 4)
SHAPES_IGNORE_LABEL = 255

_COLOURS = np.array(
    [
        (220, 40, 40),
        (40, 180, 60),
        (50, 90, 230),
        (240, 200, 30),
        (200, 60, 210),
        (30, 200, 210),
        (250, 140, 20),
        (240, 240, 240),
    ],
    dtype=np.float32,
)
_SPLIT_KEYS = {"train": 1, "val": 2}


@dataclass(frozen=True)
class ShapesPaths:
    """Where one generated version of the shapes dataset lives."""

    root: Path
    train_json: Path
    train_images: Path
    train_sem_seg: Path
    val_json: Path
    val_images: Path
    val_sem_seg: Path


def default_shapes_root() -> Path:
    """``$DETKIT_CACHE`` if set, else ``~/.cache/detkit/shapes``."""
    env = os.environ.get("DETKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "detkit" / "shapes"


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(40, 200, size=3)
    # low-frequency texture: a coarse random grid, upsampled
    gh, gw = rng.integers(3, 9), rng.integers(3, 9)
    grid = rng.normal(0, rng.uniform(8, 30), size=(gh, gw, 3)).astype(np.float32)
    tex = np.stack(
        [
            np.asarray(Image.fromarray(grid[:, :, c]).resize((w, h), Image.BILINEAR))
            for c in range(3)
        ],
        axis=2,
    )
    noise = rng.normal(0, rng.uniform(3, 12), size=(h, w, 1)).astype(np.float32)
    return base[None, None, :].astype(np.float32) + tex + noise


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """A filled shape of class ``cls`` at a random place and size: bool (h, w)."""
    size = rng.uniform(0.12, 0.45) * min(h, w)
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    r = size / 2
    if cls == 0:  # circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif cls == 1:  # rectangle, aspect 0.5..2
        a = rng.uniform(0.5, 2.0)
        rw, rh = r * np.sqrt(a), r / np.sqrt(a)
        draw.rectangle([cx - rw, cy - rh, cx + rw, cy + rh], fill=1)
    elif cls == 2:  # triangle, roughly equilateral, random rotation
        t0 = rng.uniform(0, 2 * np.pi)
        angles = t0 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.2, 0.2, 3)
        pts = [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in angles]
        draw.polygon(pts, fill=1)
    else:  # cross (plus sign), arm width a third of its size
        t = r / 3
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=1)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=1)
    return np.asarray(canvas, dtype=bool)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def paint_shapes(rng: np.random.Generator, img: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Paint 0-5 shapes (none in 5% of images) into ``img`` ``(h, w, 3)`` float32, each
    leaving at least half of every earlier one visible; -> their visible masks (later shapes
    cut earlier ones) and classes."""
    h, w = img.shape[:2]
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, 6))
    visible: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(n):
        cls = int(rng.integers(0, len(SHAPES_CLASSES)))
        for _attempt in range(10):
            m = _shape_mask(rng, cls, h, w)
            if m.sum() < 30:
                continue
            if all((v & ~m).sum() >= 0.5 * v.sum() for v in visible):
                break
        else:
            continue
        visible = [v & ~m for v in visible]
        visible.append(m)
        classes.append(cls)
        colour = _COLOURS[int(rng.integers(0, len(_COLOURS)))]
        shade = rng.normal(0, 6, size=(int(m.sum()), 1)).astype(np.float32)
        img[m] = colour[None, :] + shade
    return visible, classes


def _make_image(rng: np.random.Generator, sizes: tuple[int, int]):
    lo, hi = sizes
    h = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    w = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    img = _background(rng, h, w)
    visible, classes = paint_shapes(rng, img)
    keep = [i for i, v in enumerate(visible) if v.sum() >= 20]
    visible = [visible[i] for i in keep]
    classes = [classes[i] for i in keep]
    sem = np.zeros((h, w), np.uint8)
    for v, c in zip(visible, classes):
        sem[v] = c + 1
    for v in visible:
        sem[_boundary(v)] = SHAPES_IGNORE_LABEL
    return np.clip(img, 0, 255).astype(np.uint8), visible, classes, sem


def generate_split(
    out_dir: str | os.PathLike,
    split: str,
    num_images: int,
    *,
    image_size: tuple[int, int] = (160, 256),
    seed: int = 0,
) -> Path:
    """Write one split (json, images, semantic maps) under ``out_dir``; return the json path."""
    out = Path(out_dir)
    img_dir, sem_dir = out / split, out / f"{split}_sem"
    img_dir.mkdir(parents=True, exist_ok=True)
    sem_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        image_id = i + 1
        rng = np.random.default_rng([seed, _SPLIT_KEYS.get(split, 9), i])
        img, masks, classes, sem = _make_image(rng, image_size)
        h, w = sem.shape
        name = f"{image_id:06d}.jpg"
        Image.fromarray(img).save(img_dir / name, quality=95)
        Image.fromarray(sem).save(sem_dir / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for m, c in zip(masks, classes):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.nonzero(m)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPES_CATEGORY_IDS[c],
                    "bbox": bbox,
                    "area": int(m.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                }
            )
            ann_id += 1
    data = {
        "info": {"description": "detkit synthetic shapes", "version": SHAPES_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": n, "supercategory": "shape"}
            for i, n in zip(SHAPES_CATEGORY_IDS, SHAPES_CLASSES)
        ],
    }
    json_path = out / f"{split}.json"
    json_path.write_text(json.dumps(data, separators=(",", ":")))
    return json_path


def _paths(root: Path) -> ShapesPaths:
    return ShapesPaths(
        root=root,
        train_json=root / "train.json",
        train_images=root / "train",
        train_sem_seg=root / "train_sem",
        val_json=root / "val.json",
        val_images=root / "val",
        val_sem_seg=root / "val_sem",
    )


def ensure_shapes_dataset(
    root: str | os.PathLike | None = None,
    num_train: int = 1500,
    num_val: int = 250,
    image_size: tuple[int, int] = (160, 256),
    seed: int = 0,
) -> ShapesPaths:
    """Generate the dataset under ``root`` (default :func:`default_shapes_root`) unless present.

    The data goes to ``root/v<version>_seed<seed>_<num_train>x<num_val>_<lo>-<hi>px``; a
    ``manifest.json`` written last records the version and parameters.
    """
    base = Path(root).expanduser() if root is not None else default_shapes_root()
    lo, hi = image_size
    manifest = {"version": SHAPES_VERSION, "seed": seed, "num_train": num_train,
                "num_val": num_val, "image_size": [lo, hi]}

    def generate(tmp: Path) -> None:
        generate_split(tmp, "train", num_train, image_size=image_size, seed=seed)
        generate_split(tmp, "val", num_val, image_size=image_size, seed=seed)

    return _paths(generated_once(base / f"v{SHAPES_VERSION}_seed{seed}_{num_train}x{num_val}"
                                        f"_{lo}-{hi}px", manifest, generate))


def generated_once(final: Path, manifest: dict, generate: Callable[[Path], None]) -> Path:
    """``final``, generated unless it holds a ``manifest.json`` equal to ``manifest`` (a stale
    or damaged copy is replaced): ``generate(tmp)`` fills a temporary folder beside it, the
    manifest is written last, and the folder is renamed into place, so that a crash or a
    concurrent process never leaves a half-written set under ``final``."""
    if final.is_dir():
        try:
            if json.loads((final / "manifest.json").read_text()) == manifest:
                return final
        except (OSError, ValueError):
            pass
        shutil.rmtree(final, ignore_errors=True)  # stale or damaged: regenerate
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    try:
        generate(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not another process's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
