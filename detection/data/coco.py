"""COCO-format json -> per-image records (the dataset format every other part reads).

A record is a plain dict: ``file_name`` (absolute path), ``height``, ``width``, ``image_id``
(the json's) and ``annotations`` (may be empty), each with ``bbox`` ``[x0, y0, x1, y1]`` float
xyxy in image pixels (from COCO's xywh), ``category_id`` contiguous 0..K-1 (categories ordered
by dataset id: ids 3, 7, 42 become 0, 1, 2), ``iscrowd``, ``segmentation`` as in the json
(polygons or RLE), ``area`` and ``id`` when the json has them, and ``keypoints`` (COCO's
flat ``[x, y, v] * K``, as floats in the json's pixel coordinates) when it has them.

Metadata is a dict: ``thing_classes``, ``thing_dataset_id_to_contiguous_id``,
``contiguous_id_to_dataset_id``, ``json_file``, ``image_root``, ``evaluator_type``,
``load_stats`` (counts of what was skipped or clipped) and ``load_problem_ids`` (their ids, for
the data check's report); with a category that names keypoints, also ``keypoint_names``,
``keypoint_flip_map`` (its left_/right_ pairs) and ``keypoint_skeleton`` (1-based pairs, as the
json's ``skeleton``). An annotation with an unknown category is skipped (or an error with
``unknown_category="error"``); a box that is degenerate (under 0.01 px), not finite, missing or
entirely outside the image is skipped; one partly outside is clipped. A field of the wrong type
is refused with :class:`CocoFormatError` naming the json, the entry (``annotations[12] (id
40)``) and the field. Parsing and record building log their counts and time on large sets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from typing import Any

from detection.data.errors import DatasetError
from detection.data.keypoints import check_keypoints, flip_map_from_names
from detection.data.serialized import gc_paused

__all__ = [
    "MIN_BOX_SIZE",
    "CocoFormatError",
    "filter_images_without_annotations",
    "load_coco_json",
    "metadata_from_categories",
    "read_coco_json",
]

logger = logging.getLogger(__name__)

# Boxes narrower or lower than this (pixels) are degenerate: in float32 (the model's and
# albumentations' precision) their sides could coincide.
MIN_BOX_SIZE = 1e-2


class CocoFormatError(DatasetError):
    """A COCO json that cannot be read. The message names the file."""


# The last json parsed with ``keep=True`` (the class metadata read before training), by the
# file's identity, until the records are built from it: a start parses the json once.
_KEPT: dict[tuple, dict] = {}


def _identity(json_file: str) -> tuple | None:
    try:
        st = os.stat(json_file)
    except OSError:
        return None
    return (os.path.realpath(json_file), st.st_size, st.st_mtime_ns)


def read_coco_json(json_file: str | os.PathLike, *, keep: bool = False) -> dict:
    """Parse a COCO json; errors name the file (and the line/column of a syntax error).

    ``keep``: also hold the parsed json (one at a time) for the next read of the same
    unchanged file, which takes it instead of parsing again (the metadata read, then the
    records built from the same json, as a training start does). ``load_coco_json`` consumes
    the json it takes: its ``images`` and ``annotations`` entries are dropped as records are
    built from them, so do not hold on to a kept json for other uses."""
    json_file = os.fspath(json_file)
    key = _identity(json_file)
    if key is not None and key in _KEPT:
        return _KEPT[key] if keep else _KEPT.pop(key)
    t0 = time.perf_counter()
    try:
        with open(json_file, encoding="utf-8") as f:
            with gc_paused():
                data = json.load(f)
    except FileNotFoundError as e:
        raise CocoFormatError(f"COCO json not found: {json_file}") from e
    except json.JSONDecodeError as e:
        raise CocoFormatError(
            f"Malformed JSON in {json_file}: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"COCO json {json_file} is not UTF-8 text: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoFormatError(f"{json_file} is not a COCO json: no top-level 'images' list")
    for part in ("annotations", "categories"):
        if not isinstance(data.get(part, []), list):
            raise CocoFormatError(
                f"{json_file}: top-level '{part}' is a {type(data[part]).__name__}, not a list")
    seconds = time.perf_counter() - t0
    if seconds > 1.0 or len(data["images"]) > 5000:
        logger.info("Parsed %s: %d images, %d annotations, %d categories in %.1f s", json_file,
                    len(data["images"]), len(data.get("annotations", [])),
                    len(data.get("categories", [])), seconds)
    if keep and key is not None:
        _KEPT.clear()
        _KEPT[key] = data
    return data


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is an integer (or an integral float), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _field_int(entry: dict, key: str, where: str, *, positive: bool = False) -> int:
    """``entry[key]`` as an int, or CocoFormatError naming ``where`` and the field."""
    value = _as_int(entry[key])
    if value is None or (positive and value <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise CocoFormatError(f"{where}: field '{key}' is {entry[key]!r}, not {kind}")
    return value


def metadata_from_categories(categories: list[dict]) -> dict[str, Any]:
    """thing_classes and the id maps from a COCO ``categories`` list (ordered by id)."""
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c:
            raise CocoFormatError(f"categories[{k}] is not an object with an 'id': {c!r:.80}")
        if _as_int(c["id"]) is None:
            raise CocoFormatError(f"categories[{k}]: field 'id' is {c['id']!r}, not an integer")
    cats = sorted(categories, key=lambda c: _as_int(c["id"]))
    ids = [_as_int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        dup = [i for i, n in Counter(ids).items() if n > 1]
        raise CocoFormatError(f"Duplicate category ids {dup}")
    meta: dict[str, Any] = {
        "thing_classes": [str(c.get("name", c["id"])) for c in cats],
        "thing_dataset_id_to_contiguous_id": {d: i for i, d in enumerate(ids)},
        "contiguous_id_to_dataset_id": ids,
    }
    with_names = [c for c in cats if c.get("keypoints")]
    if with_names:
        names = with_names[0]["keypoints"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CocoFormatError(f"category {with_names[0]['id']}: field 'keypoints' is not "
                                  "a list of names")
        meta["keypoint_names"] = list(names)
        meta["keypoint_flip_map"] = flip_map_from_names(names)
        meta["keypoint_skeleton"] = [list(p) for p in with_names[0].get("skeleton", [])]
    return meta


def _convert_box(bbox: Any, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """COCO xywh -> clipped xyxy, or (None, reason) for a box to skip."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None, "invalid_box"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, "invalid_box"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, "invalid_box"
    if w < MIN_BOX_SIZE or h < MIN_BOX_SIZE:
        return None, "degenerate_box"
    x0, y0, x1, y1 = x, y, x + w, y + h
    c0, c1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
    d0, d1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
    if c1 - c0 < MIN_BOX_SIZE or d1 - d0 < MIN_BOX_SIZE:
        return None, "outside_image"
    reason = "clipped" if (c0, d0, c1, d1) != (x0, y0, x1, y1) else None
    return [c0, d0, c1, d1], reason


def load_coco_json(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    dataset_name: str | None = None,
    *,
    unknown_category: str = "skip",
) -> tuple[list[dict], dict[str, Any]]:
    """Load a COCO instances (or image-info) json into records and metadata; see module doc."""
    if unknown_category not in ("skip", "error"):
        raise ValueError(f"unknown_category must be 'skip' or 'error', got {unknown_category!r}")
    with gc_paused():  # millions of new containers: no collections walking them meanwhile
        return _load_coco_json(json_file, image_root, dataset_name, unknown_category)


def _load_coco_json(json_file: str | os.PathLike, image_root: str | os.PathLike,
                    dataset_name: str | None, unknown_category: str
                    ) -> tuple[list[dict], dict[str, Any]]:
    json_file = os.path.abspath(os.fspath(json_file))
    image_root = os.path.abspath(os.fspath(image_root))
    data = read_coco_json(json_file)
    t0 = time.perf_counter()
    try:
        meta = metadata_from_categories(data.get("categories", []))
    except CocoFormatError as e:
        raise CocoFormatError(f"{json_file}: {e}") from e
    id_map = meta["thing_dataset_id_to_contiguous_id"]
    num_keypoints = {_as_int(c["id"]): len(c["keypoints"]) for c in data.get("categories", [])
                     if isinstance(c.get("keypoints"), list) and c["keypoints"]}

    # The json is this load's own (parsed here, or handed over by a ``keep`` read): each
    # entry is dropped once its record is built, so the records reuse the memory of the json
    # objects instead of adding to it (a COCO-sized json is over a GiB of Python objects).
    images, anns = data.pop("images"), data.pop("annotations", [])
    records: dict[int, dict] = {}
    for k in range(len(images)):
        img, images[k] = images[k], None
        where = f"{json_file}: images[{k}]"
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise CocoFormatError(f"{where} is not an object with 'id' and 'file_name': "
                                  f"{img!r:.80}")
        image_id = _field_int(img, "id", where)
        file_name = img["file_name"]
        if not isinstance(file_name, str) or not file_name or "\0" in file_name:
            raise CocoFormatError(f"{where}: field 'file_name' is {file_name!r}, not a path")
        if image_id in records:
            raise CocoFormatError(f"{json_file}: duplicate image id {image_id}")
        records[image_id] = {
            "file_name": os.path.join(image_root, file_name),
            "height": _field_int(img, "height", where, positive=True) if "height" in img else None,
            "width": _field_int(img, "width", where, positive=True) if "width" in img else None,
            "image_id": image_id,
            "annotations": [],
        }

    stats: Counter[str] = Counter()
    examples: dict[str, list] = {}
    for k in range(len(anns)):
        ann, anns[k] = anns[k], None
        if not isinstance(ann, dict):
            raise CocoFormatError(f"{json_file}: annotations[{k}] is a {type(ann).__name__}, "
                                  "not an object")
        ann_id = ann.get("id")
        where = f"{json_file}: annotations[{k}] (id {ann_id!r:.40})"
        if ann_id is not None and not isinstance(ann_id, str) and _as_int(ann_id) is None:
            raise CocoFormatError(f"{where}: field 'id' is not an integer or a string")
        if "image_id" not in ann or _as_int(ann["image_id"]) is None:
            raise CocoFormatError(f"{where}: field 'image_id' is {ann.get('image_id')!r:.40}, "
                                  "not an integer")
        rec = records.get(_as_int(ann["image_id"]))
        if rec is None:
            stats["unknown_image"] += 1
            examples.setdefault("unknown_image", []).append(ann_id)
            continue
        cat = _as_int(ann.get("category_id"))
        if cat not in id_map:
            if unknown_category == "error":
                raise CocoFormatError(
                    f"{json_file}: annotation id {ann_id} has category_id "
                    f"{ann.get('category_id')!r:.40}, "
                    f"not among the categories {sorted(id_map)}"
                )
            stats["unknown_category"] += 1
            examples.setdefault("unknown_category", []).append(ann_id)
            continue
        width, height = rec["width"], rec["height"]
        if width is None or height is None:
            raise CocoFormatError(f"{json_file}: image {rec['image_id']} has no width/height")
        box, reason = _convert_box(ann.get("bbox"), width, height)
        if reason is not None:
            stats[reason] += 1
            examples.setdefault(reason, []).append(ann_id)
        if box is None:
            continue
        iscrowd = _as_int(ann.get("iscrowd", 0))
        if iscrowd not in (0, 1):
            raise CocoFormatError(f"{where}: field 'iscrowd' is {ann['iscrowd']!r:.40}, not 0/1")
        out = {"bbox": box, "category_id": id_map[cat], "iscrowd": iscrowd}
        if "segmentation" in ann:
            out["segmentation"] = ann["segmentation"]
        if "area" in ann:
            area = ann["area"]
            if isinstance(area, bool) or not isinstance(area, (int, float)):
                raise CocoFormatError(f"{where}: field 'area' is {area!r:.40}, not a number")
            out["area"] = float(area)
        if "keypoints" in ann:
            try:
                out["keypoints"] = check_keypoints(ann["keypoints"], num_keypoints.get(cat), where)
            except ValueError as e:
                raise CocoFormatError(str(e)) from e
        if ann_id is not None:
            out["id"] = ann_id
        rec["annotations"].append(out)

    name = dataset_name or os.path.basename(json_file)
    for reason, n in sorted(stats.items()):
        action = "clipped to the image" if reason == "clipped" else "skipped"
        logger.warning(
            "%s: %d annotation(s) %s (%s); first ids: %s",
            name,
            n,
            action,
            reason,
            examples[reason][:5],
        )
    meta.update(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        load_stats=dict(stats),
        load_problem_ids=examples,
    )
    if dataset_name is not None:
        meta["name"] = dataset_name
    seconds = time.perf_counter() - t0
    if seconds > 1.0 or len(records) > 5000:
        logger.info("Built %d records (%d annotations) of %s in %.1f s", len(records),
                    sum(len(r["annotations"]) for r in records.values()), name, seconds)
    return list(records.values()), meta


def filter_images_without_annotations(records: list[dict]) -> list[dict]:
    """Keep the records that have at least one non-crowd annotation (for training)."""
    kept = [r for r in records if any(a.get("iscrowd", 0) == 0 for a in r["annotations"])]
    if len(kept) < len(records):
        logger.info("Removed %d images without usable annotations", len(records) - len(kept))
    return kept
