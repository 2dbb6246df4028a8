"""Keypoint annotations: COCO's ``keypoints`` ``[x, y, v] * K`` checked into floats, the
person keypoints' names, and the left/right pairs a horizontal flip exchanges (detectron2's
``keypoint_flip_map``)."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

__all__ = [
    "COCO_PERSON_KEYPOINT_NAMES",
    "COCO_PERSON_SKELETON",
    "check_keypoints",
    "filter_images_with_few_keypoints",
    "flip_indices",
    "flip_map_from_names",
]

logger = logging.getLogger(__name__)

COCO_PERSON_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)

# The person category's ``skeleton`` in COCO's keypoint json, 0-based: limbs as keypoint pairs.
COCO_PERSON_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)


def check_keypoints(value: Any, num_keypoints: int | None, where: str) -> list[float]:
    """COCO's flat ``[x, y, v] * K`` as floats; a ValueError naming ``where`` when it is not a
    list of finite numbers whose length is ``3 * num_keypoints`` (a multiple of 3 when the
    category names no keypoints) or a visibility outside 0, 1, 2."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: field 'keypoints' is {type(value).__name__}, not a list "
                         "[x, y, v] * K")
    want = 3 * num_keypoints if num_keypoints else None
    if (want is not None and len(value) != want) or len(value) % 3:
        expected = f"{want} ({num_keypoints} keypoints x 3)" if want else "a multiple of 3"
        raise ValueError(f"{where}: field 'keypoints' has {len(value)} numbers, expected "
                         f"{expected}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: field 'keypoints'[{i}] is {v!r:.40}, not a finite "
                             "number")
        out.append(float(v))
    if any(v not in (0.0, 1.0, 2.0) for v in out[2::3]):
        raise ValueError(f"{where}: field 'keypoints' has a visibility outside 0, 1, 2")
    return out


def flip_map_from_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(left_*, right_*)`` name pairs among ``names`` (detectron2's keypoint_flip_map)."""
    pairs = []
    for n in names:
        if n.startswith("left_") and "right_" + n[len("left_"):] in names:
            pairs.append((n, "right_" + n[len("left_"):]))
    return pairs


def flip_indices(names: Sequence[str], flip_map: Sequence[Sequence[str]]) -> list[int]:
    """The permutation a horizontal flip applies to keypoints named ``names``: index ``i``
    takes the keypoint of ``result[i]``."""
    index = {n: i for i, n in enumerate(names)}
    perm = list(range(len(names)))
    for a, b in flip_map:
        if a not in index or b not in index:
            raise ValueError(f"keypoint flip pair ({a!r}, {b!r}) names a keypoint not among "
                             f"{list(names)}")
        perm[index[a]], perm[index[b]] = index[b], index[a]
    return perm


def filter_images_with_few_keypoints(records: list[dict], min_keypoints: int) -> list[dict]:
    """Keep the records whose annotations hold at least ``min_keypoints`` visible (v > 0)
    keypoints in all (detectron2's ``MIN_KEYPOINTS_PER_IMAGE``, for training)."""

    def visible(record: dict) -> int:
        return sum(sum(1 for v in a["keypoints"][2::3] if v > 0)
                   for a in record["annotations"] if "keypoints" in a)

    kept = [r for r in records if visible(r) >= min_keypoints]
    if len(kept) < len(records):
        logger.info("Removed %d images with fewer than %d visible keypoints",
                    len(records) - len(kept), min_keypoints)
    return kept
