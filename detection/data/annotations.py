"""A record's annotations, checked: box and class fields, polygons and RLEs -> masks.

Every refusal is a :class:`~detection.data.errors.DatasetError` naming the annotation and the
field: :class:`InvalidSegmentationError` for a segmentation that cannot become a mask,
:class:`~detection.data.errors.InvalidAnnotationError` for a malformed box or class. RLEs are
checked before pycocotools sees them (its decoder trusts the run lengths).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from detection.data.errors import DatasetError, InvalidAnnotationError

__all__ = [
    "InvalidSegmentationError",
    "annotation_box_label",
    "annotation_to_mask",
    "validate_segmentation",
]


class InvalidSegmentationError(DatasetError):
    """A COCO segmentation that cannot become a mask (degenerate polygon, RLE of another size)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_polygon(p: Any, k: int, where: str, height: int, width: int) -> None:
    if not isinstance(p, (list, tuple)) or not all(_is_number(v) for v in p):
        raise InvalidSegmentationError(f"{where}: polygon {k} is not a list of numbers: {p!r:.60}")
    if len(p) < 6 or len(p) % 2:
        raise InvalidSegmentationError(
            f"{where}: polygon {k} has {len(p)} coordinates; a polygon needs at least "
            "3 points (6 numbers), as x, y pairs")
    arr = np.asarray(p, np.float64)
    lim = max(height, width)
    if not np.isfinite(arr).all() or arr.min() < -lim or arr.max() > 2 * lim:
        raise InvalidSegmentationError(
            f"{where}: polygon {k} has coordinates that are not finite or lie far outside the "
            f"{height}x{width} image (range {arr.min():.4g}..{arr.max():.4g})")


def _compressed_rle_total(counts: str, where: str) -> int:
    """Sum of the run lengths of a compressed COCO RLE string (pycocotools' LEB128-like code)."""
    runs: list[int] = []
    x = shift = 0
    more = False
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise InvalidSegmentationError(f"{where}: RLE counts hold the character {ch!r}")
        x |= (c & 0x1F) << shift
        shift += 5
        more = bool(c & 0x20)
        if more:
            continue
        if c & 0x10:
            x |= -1 << shift
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise InvalidSegmentationError(f"{where}: RLE counts decode to a negative run")
        runs.append(x)
        x = shift = 0
    if more:
        raise InvalidSegmentationError(f"{where}: RLE counts string ends inside a number")
    return sum(runs)


def _check_rle(seg: dict, where: str, height: int, width: int) -> None:
    """An RLE whose size is the image's and whose runs cover it exactly; else the error."""
    size = seg.get("size")
    ok = isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_number(v) for v in size)
    if not ok or tuple(size) != (height, width):
        raise InvalidSegmentationError(
            f"{where}: RLE size {size!r:.40} does not match its image's (height, width) "
            f"{(height, width)}")
    counts = seg.get("counts")
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as e:
            raise InvalidSegmentationError(f"{where}: RLE counts are not ASCII") from e
    if isinstance(counts, str):
        total = _compressed_rle_total(counts, where)
    elif isinstance(counts, list) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in counts
    ):
        total = int(sum(counts))
    else:
        raise InvalidSegmentationError(
            f"{where}: RLE counts must be a string or a list of non-negative integers, got "
            f"{counts!r:.40}")
    if total != height * width:
        raise InvalidSegmentationError(
            f"{where}: RLE runs cover {total} pixels, but the {height}x{width} image has "
            f"{height * width}")


def validate_segmentation(segmentation: Any, height: int, width: int, *,
                          ann_id: Any = None) -> None:
    """Raise :class:`InvalidSegmentationError`, naming ``ann_id``, unless ``segmentation`` can
    become a (height, width) mask: polygons must be lists of at least 6 finite numbers in x, y
    pairs, within -max(h, w)..2 max(h, w); an RLE must have the image's size and counts (a
    compressed string or a list of non-negative integers) whose runs cover it exactly."""
    where = f"annotation {ann_id}" if ann_id is not None else "annotation"
    if isinstance(segmentation, list):
        if not segmentation:
            raise InvalidSegmentationError(f"{where}: empty polygon list")
        for k, p in enumerate(segmentation):
            _check_polygon(p, k, where, height, width)
    elif isinstance(segmentation, dict):
        _check_rle(segmentation, where, height, width)
    else:
        raise InvalidSegmentationError(
            f"{where}: unsupported segmentation type {type(segmentation).__name__}")


def annotation_to_mask(segmentation: Any, height: int, width: int, *,
                       ann_id: Any = None) -> np.ndarray:
    """A COCO segmentation (polygons, RLE with str/bytes counts, or uncompressed RLE) -> uint8
    (height, width) mask; :class:`InvalidSegmentationError` as :func:`validate_segmentation`
    says."""
    validate_segmentation(segmentation, height, width, ann_id=ann_id)
    if isinstance(segmentation, list):
        polys = [[float(v) for v in p] for p in segmentation]
        rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
    else:
        counts = segmentation["counts"]
        if isinstance(counts, list):
            uncompressed = {"size": [height, width], "counts": [int(v) for v in counts]}
            rle = mask_util.frPyObjects(uncompressed, height, width)
        else:
            rle = {"size": [height, width],
                   "counts": counts if isinstance(counts, bytes) else counts.encode("ascii")}
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)


def annotation_box_label(ann: Any, where: str) -> tuple[list[float], int]:
    """An annotation's ``bbox`` (xyxy) and ``category_id``, checked; InvalidAnnotationError names
    ``where`` and the field otherwise."""
    if not isinstance(ann, dict):
        raise InvalidAnnotationError(f"{where}: an annotation is a {type(ann).__name__}, "
                                     "not a dict")
    where = f"{where}, annotation {ann.get('id')!r:.40}"
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4 or not all(
            _is_number(v) and math.isfinite(v) for v in box):
        raise InvalidAnnotationError(f"{where}: field 'bbox' is {box!r:.60}, not 4 finite numbers")
    label = ann.get("category_id")
    if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or label < 0:
        raise InvalidAnnotationError(
            f"{where}: field 'category_id' is {label!r:.40}, not a contiguous class id >= 0")
    return [float(v) for v in box], int(label)
