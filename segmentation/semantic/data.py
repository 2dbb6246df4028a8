"""Semantic segmentation data: label maps from PNG files or from COCO instance annotations, and
a mapper that augments image and label map together.

Label PNGs hold one class index per pixel (mode L, P or 16-bit I), with ``ignore_value`` (255
in Cityscapes' trainId maps, ADE20K's and the shapes set's) marking pixels that count for
nothing. Records name theirs in ``sem_seg_file_name``; records without one get a map painted
from their instance annotations (:func:`sem_seg_from_coco`).

Output of :class:`SemanticDatasetMapper` (a plain dict)::

    "image":      uint8 Tensor[3, H, W], RGB (resized / flipped / cropped in training)
    "sem_seg":    int64 Tensor[H, W], the label map on the same pixels
    "height", "width", "image_id", "file_name", "sem_seg_file_name" (when the record has one)
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from detection.data.image_io import ImageReadError, read_image
from detection.data.mapper import (
    InvalidSegmentationError,
    annotation_to_mask,
    draw_short_edge,
    train_resized_shape,
)

__all__ = ["SemanticDatasetMapper", "read_label_map", "sem_seg_from_coco"]

_SKIPPED_POLYGONS = [0]  # instances with degenerate polygons skipped by sem_seg_from_coco
logger = logging.getLogger(__name__)


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """A label PNG -> (H, W) integer array of class indices (uint8, or int32 for 16-bit files).

    Palette (P) images give their palette indices, as VOC and Cityscapes ship them. Colour (RGB)
    label images are refused: their colours would first need mapping to class indices.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"Label file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "P"):
                return np.array(img, dtype=np.uint8)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                return np.array(img, dtype=np.int32)
            raise ValueError(f"Label file {path} has mode {img.mode}; a label map must hold one "
                             "class index per pixel (mode L, P or 16-bit), not colours")
    except UnidentifiedImageError as e:
        raise ImageReadError(f"Not a readable label image: {path}") from e
    except OSError as e:
        raise ImageReadError(f"Cannot decode label image {path}: {e}") from e


def sem_seg_from_coco(
    record: dict, num_classes: int, *, ignore_value: int = 255
) -> np.ndarray:
    """Paint a record's instance masks into a (H, W) uint8 label map.

    Background is 0 and annotation class ``c`` (contiguous 0..K-1) becomes ``c + 1``, so
    ``num_classes`` is K + 1. Annotations are painted in order, later ones over earlier ones;
    crowd regions become ``ignore_value`` wherever no other instance covers them.
    """
    h, w = int(record["height"]), int(record["width"])
    sem = np.zeros((h, w), np.uint8)
    crowd = np.zeros((h, w), bool)
    for ann in record.get("annotations", []):
        if "segmentation" not in ann:
            continue
        label = int(ann["category_id"]) + 1
        if not 1 <= label < num_classes:
            raise ValueError(f"{record.get('file_name')}: annotation category {label - 1} does "
                             f"not fit {num_classes} classes (background + {num_classes - 1})")
        try:
            mask = annotation_to_mask(ann["segmentation"], h, w,
                                      ann_id=ann.get("id")).astype(bool)
        except InvalidSegmentationError as e:
            if not isinstance(ann["segmentation"], list):  # an RLE of another size: bad data
                raise
            _SKIPPED_POLYGONS[0] += 1  # a degenerate polygon paints nothing, as in training
            logger.warning("%s: skipped an instance (%d so far): %s", record.get("file_name"),
                           _SKIPPED_POLYGONS[0], e)
            continue
        if ann.get("iscrowd", 0):
            crowd |= mask
        else:
            sem[mask] = label
    sem[crowd & (sem == 0)] = ignore_value
    return sem


def check_label_values(
    label: np.ndarray, num_classes: int, ignore_value: int, source: str
) -> None:
    """Raise ValueError naming ``source`` and the offending values when ``label`` holds values
    outside 0..num_classes-1 other than ``ignore_value``."""
    if label.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    else:
        present = np.unique(label)
    bad = [int(v) for v in present if (v < 0 or v >= num_classes) and v != ignore_value]
    if bad:
        shown = bad[:10] + (["..."] if len(bad) > 10 else [])
        raise ValueError(f"Label file {source} has values {shown} outside the classes "
                         f"0..{num_classes - 1} (ignore value {ignore_value})")


class SemanticDatasetMapper:
    """Record -> ``{"image", "sem_seg", ...}`` (see the module doc).

    Training: shortest edge resized to a size drawn from ``min_size_train`` (long edge capped
    at ``max_size_train``; image bilinear, labels nearest), horizontal flip, an optional random
    crop of ``crop_size`` (padded with the ignore value where the image is smaller) and optional
    colour jitter. Evaluation: the original image and label map.
    """

    def __init__(
        self, is_train: bool, *, num_classes: int, ignore_value: int = 255,
        min_size_train: Sequence[int] = (512,), max_size_train: int = 2048,
        min_size_sampling: str = "choice", resize: bool = True, hflip_prob: float = 0.5,
        crop_size: Sequence[int] = (), photometric: bool = False, photometric_prob: float = 0.8,
        brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
        hue: float = 0.02,
    ) -> None:
        if min_size_sampling not in ("choice", "range"):
            raise ValueError(f"min_size_sampling must be 'choice' or 'range': {min_size_sampling}")
        if crop_size and len(crop_size) != 2:
            raise ValueError(f"crop_size must be (height, width) or empty, got {crop_size}")
        self.is_train, self.num_classes = is_train, int(num_classes)
        self.ignore_value = int(ignore_value)
        self.min_size_train = tuple(int(s) for s in min_size_train)
        self.max_size_train, self.min_size_sampling = int(max_size_train), min_size_sampling
        self.resize, self.hflip_prob = resize, float(hflip_prob)
        self.crop_size = tuple(int(s) for s in crop_size)
        self.photometric, self.photometric_prob = photometric, photometric_prob
        self.jitter = (brightness, contrast, saturation, hue)

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool) -> SemanticDatasetMapper:
        """From ``cfg.INPUT`` and ``cfg.MODEL.SEM_SEG_HEAD`` (classes, ignore value)."""
        p, head = cfg.INPUT.PHOTOMETRIC, cfg.MODEL.SEM_SEG_HEAD
        crop = cfg.INPUT.CROP
        return cls(
            is_train, num_classes=head.NUM_CLASSES, ignore_value=head.IGNORE_VALUE,
            min_size_train=cfg.INPUT.MIN_SIZE_TRAIN, max_size_train=cfg.INPUT.MAX_SIZE_TRAIN,
            min_size_sampling=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            resize=bool(cfg.INPUT.MIN_SIZE_TRAIN), hflip_prob=cfg.INPUT.HFLIP_PROB,
            crop_size=tuple(crop.SIZE) if crop.ENABLED else (), photometric=p.ENABLED,
            photometric_prob=p.PROB, brightness=p.BRIGHTNESS, contrast=p.CONTRAST,
            saturation=p.SATURATION, hue=p.HUE,
        )

    def load_label(self, record: dict, image_shape: tuple[int, int]) -> np.ndarray:
        """The record's (H, W) label map, checked against its image's size and the classes."""
        path = record.get("sem_seg_file_name")
        if path:
            label = read_label_map(path)
            source = str(path)
            if label.shape != tuple(image_shape):
                raise ValueError(
                    f"Label file {path} is {label.shape[0]}x{label.shape[1]} (HxW) but its "
                    f"image {record['file_name']} is {image_shape[0]}x{image_shape[1]}"
                )
        else:
            label = sem_seg_from_coco(record, self.num_classes, ignore_value=self.ignore_value)
            source = f"(painted from the annotations of {record['file_name']})"
            if label.shape != tuple(image_shape):
                raise ValueError(f"Image {record['file_name']} is {image_shape} but its record "
                                 f"says {label.shape}")
        check_label_values(label, self.num_classes, self.ignore_value, source)
        return label

    def _transforms(self, h: int, w: int, rng: np.random.Generator) -> A.Compose:
        ops: list[A.BasicTransform] = []
        if self.resize:
            short = draw_short_edge(self.min_size_train, self.min_size_sampling, rng)
            nh, nw = train_resized_shape(h, w, short, self.max_size_train)
            ops.append(A.Resize(nh, nw, mask_interpolation=0))  # cv2.INTER_NEAREST
        if rng.random() < self.hflip_prob:
            ops.append(A.HorizontalFlip(p=1.0))
        if self.crop_size:
            ch, cw = self.crop_size
            ops.append(A.PadIfNeeded(min_height=ch, min_width=cw, position="top_left",
                                     border_mode=0, fill=0, fill_mask=self.ignore_value))
            ops.append(A.RandomCrop(ch, cw))
        if self.photometric:
            b, c, s, hue = self.jitter
            ops.append(A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=hue,
                                     p=self.photometric_prob))
        return A.Compose(ops, seed=int(rng.integers(2**31 - 1)))

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict[str, Any]:
        image = read_image(record["file_name"])
        h, w = image.shape[:2]
        label = self.load_label(record, (h, w))
        if self.is_train:
            rng = rng if rng is not None else np.random.default_rng()
            res = self._transforms(h, w, rng)(image=image, mask=label)
            image, label = res["image"], np.asarray(res["mask"])
        out: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "sem_seg": torch.from_numpy(label.astype(np.int64)),
            "height": h,
            "width": w,
            "image_id": record.get("image_id"),
            "file_name": record["file_name"],
        }
        if record.get("sem_seg_file_name"):
            out["sem_seg_file_name"] = record["sem_seg_file_name"]
        return out
