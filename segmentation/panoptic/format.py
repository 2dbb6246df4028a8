"""The COCO panoptic format: segment-id maps stored as RGB PNGs, ``id = R + 256 G + 256^2 B``
(0 is void), with a json whose ``annotations[i]`` name the PNG (``file_name``) and describe
each segment (``segments_info``: ``id``, ``category_id``, ``iscrowd``, ``bbox`` xywh, ``area``).

Every reader here checks that the ids of a PNG and the segments of its json entry agree: an id
in the PNG with no segment, or a segment whose id the PNG lacks, is an error naming the file.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "VOID",
    "PanopticFormatError",
    "check_segment_ids",
    "id2rgb",
    "read_panoptic_png",
    "rgb2id",
    "segment_areas",
    "write_panoptic_png",
]

VOID = 0  # the id of unlabelled pixels


class PanopticFormatError(ValueError):
    """A panoptic PNG and its json entry disagree, or the PNG cannot be read."""


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 segment ids, ``R + 256 G + 256^2 B``."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got {rgb.shape}")
    c = rgb.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids (0 .. 256^3 - 1) -> (H, W, 3) uint8 RGB."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"segment ids must lie in 0..{256**3 - 1}, got {ids.min()}..{ids.max()}")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """A COCO panoptic PNG -> (H, W) int64 segment ids. RGB(A) PNGs are decoded with
    :func:`rgb2id`; a single-channel PNG (L, P or 16-bit) holds the ids directly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PanopticFormatError(f"Panoptic PNG not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA"):
                return rgb2id(np.asarray(img.convert("RGB")))
            if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
                return np.asarray(img, dtype=np.int64)
            raise PanopticFormatError(f"Panoptic PNG {path} has mode {img.mode}; expected RGB "
                                      "(id = R + 256 G + 256^2 B)")
    except (UnidentifiedImageError, OSError) as e:
        raise PanopticFormatError(f"Cannot decode panoptic PNG {path}: {e}") from e


def write_panoptic_png(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Write (H, W) segment ids as a COCO panoptic RGB PNG."""
    Image.fromarray(id2rgb(ids)).save(os.fspath(path))


def segment_areas(ids: np.ndarray) -> Dict[int, int]:
    """Pixel count of every id present in the (H, W) map, void included."""
    values, counts = np.unique(ids, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def check_segment_ids(areas: Mapping[int, int], segments_info: Iterable[Mapping[str, Any]],
                      source: str) -> None:
    """Refuse a map whose ids and segments disagree (``areas``: id -> pixels, from
    :func:`segment_areas`). ``source`` names the file in the error."""
    declared = [int(s["id"]) for s in segments_info]
    dupes = sorted({i for i in declared if declared.count(i) > 1})
    if dupes:
        raise PanopticFormatError(f"{source}: segments_info lists ids {dupes} more than once")
    if VOID in declared:
        raise PanopticFormatError(f"{source}: segment id 0 is reserved for void pixels")
    present = {i for i in areas if i != VOID}
    unknown = sorted(present - set(declared))
    if unknown:
        raise PanopticFormatError(
            f"{source}: ids {unknown[:10]} are in the PNG but have no segment in the json "
            f"(segments: {sorted(declared)[:10]})")
    absent = sorted(set(declared) - present)
    if absent:
        raise PanopticFormatError(
            f"{source}: segments {absent[:10]} of the json have no pixel in the PNG")


def segments_to_json(segments_info: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """segments_info with plain Python numbers (for json.dump)."""
    out = []
    for s in segments_info:
        out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in s.items()})
    return out
