"""COCO panoptic data: the json and its PNG id maps as records, the semantic maps and instance
targets derived from them, and the mapper that augments image, semantic map and instance masks
together.

A record (one per json annotation) is a plain dict::

    "file_name", "height", "width", "image_id"    as detection's COCO records
    "pan_seg_file_name": str                       the PNG of segment ids
    "segments_info": [                             every segment of the PNG
        {"id", "category_id" (dataset id), "iscrowd", "bbox" (xywh), "area",
         "isthing": bool, "label": int}            label: contiguous thing class 0..K-1, or a
    ]                                              stuff class's semantic label 1..S
    "annotations": [...]                           the thing segments as detection's annotations
                                                   (bbox xyxy, contiguous category_id, iscrowd),
                                                   for the data check and AP tooling

The semantic map of Panoptic FPN (detectron2's convention) labels every thing pixel 0 (one
"things" class), stuff class ``s`` as ``s`` (1..S) and void 255 (ignored).

:class:`PanopticDatasetMapper` output (plain dicts): in training ``"image"`` and
``"instances"`` (``boxes``, ``labels``, ``masks`` of the non-crowd things, and the ``sem_seg``
map: the targets the model takes); in evaluation ``"image"`` (the original), ``"height"``,
``"width"``, ``"image_id"``, ``"file_name"``, ``"pan_seg_file_name"`` and ``"segments_info"`` for
:class:`~segmentation.panoptic.evaluation.PanopticEvaluator`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch

from detection.data.coco import CocoFormatError, read_coco_json
from detection.data.image_io import ImageReadError, read_image
from detection.data.mapper import draw_short_edge, train_resized_shape

from .format import check_segment_ids, read_panoptic_png, segment_areas

__all__ = [
    "PanopticDatasetMapper",
    "load_coco_panoptic_json",
    "panoptic_metadata",
    "panoptic_targets",
]

logger = logging.getLogger(__name__)


def panoptic_metadata(categories: Sequence[dict]) -> dict[str, Any]:
    """Class metadata of a panoptic category list (``id``, ``name``, ``isthing``): things in id
    order are the detector's classes 0..K-1, stuff in id order the semantic labels 1..S."""
    cats = sorted(categories, key=lambda c: int(c["id"]))
    things = [c for c in cats if c.get("isthing", 0)]
    stuff = [c for c in cats if not c.get("isthing", 0)]
    return {
        "thing_classes": [str(c["name"]) for c in things],
        "thing_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(things)},
        "contiguous_id_to_dataset_id": [int(c["id"]) for c in things],
        "stuff_classes": ["things", *[str(c["name"]) for c in stuff]],
        "stuff_dataset_ids": [int(c["id"]) for c in stuff],
        "panoptic_categories": [{"id": int(c["id"]), "name": str(c["name"]),
                                 "isthing": int(bool(c.get("isthing", 0)))} for c in cats],
        "ignore_label": 255,
        "evaluator_type": "coco_panoptic",
    }


def load_coco_panoptic_json(
    json_file: str | os.PathLike, image_root: str | os.PathLike,
    panoptic_root: str | os.PathLike,
) -> tuple[list[dict], dict[str, Any]]:
    """A COCO panoptic json -> (records, metadata); see the module doc. A segment of an unknown
    category, or an annotation of an unknown image, is an error naming the json and the PNG.
    The PNGs are read by the mapper and the evaluator, which check their ids."""
    data = read_coco_json(json_file)
    meta = panoptic_metadata(data.get("categories", []))
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = {d: i + 1 for i, d in enumerate(meta["stuff_dataset_ids"])}
    images = {int(im["id"]): im for im in data["images"]}
    records = []
    for k, ann in enumerate(data.get("annotations", [])):
        where = f"{json_file}: annotations[{k}] ({ann.get('file_name')})"
        if "file_name" not in ann or "segments_info" not in ann:
            raise CocoFormatError(f"{where}: a panoptic annotation needs 'file_name' and "
                                  "'segments_info'")
        image = images.get(int(ann["image_id"]))
        if image is None:
            raise CocoFormatError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        segments, annotations = [], []
        for s in ann["segments_info"]:
            cat = int(s["category_id"])
            if cat not in thing_map and cat not in stuff_map:
                raise CocoFormatError(f"{where}: segment {s.get('id')} has unknown category_id "
                                      f"{cat}")
            isthing = cat in thing_map
            seg = {"id": int(s["id"]), "category_id": cat, "iscrowd": int(s.get("iscrowd", 0)),
                   "isthing": isthing, "label": thing_map[cat] if isthing else stuff_map[cat]}
            for key in ("bbox", "area"):
                if key in s:
                    seg[key] = s[key]
            segments.append(seg)
            if isthing and "bbox" in s:
                x, y, w, h = (float(v) for v in s["bbox"])
                annotations.append({"bbox": [x, y, x + w, y + h], "category_id": seg["label"],
                                    "iscrowd": seg["iscrowd"], "area": float(s.get("area", 0)),
                                    "id": seg["id"]})
        records.append({
            "file_name": str(Path(image_root) / image["file_name"]),
            "height": int(image["height"]), "width": int(image["width"]),
            "image_id": int(image["id"]),
            "pan_seg_file_name": str(Path(panoptic_root) / ann["file_name"]),
            "segments_info": segments, "annotations": annotations,
        })
    meta.update(json_file=str(Path(json_file).resolve()),
                image_root=str(Path(image_root).resolve()),
                panoptic_root=str(Path(panoptic_root).resolve()))
    return records, meta


def panoptic_targets(ids: np.ndarray, segments_info: Sequence[dict], *, source: str,
                     ignore_value: int = 255) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """An (H, W) id map and its record's segments -> (semantic map (H, W) uint8: things 0,
    stuff its label, void ``ignore_value``; non-crowd thing masks (H, W) uint8; their classes).
    Ids and segments must agree (errors name ``source``)."""
    check_segment_ids(segment_areas(ids), segments_info, source)
    sem = np.full(ids.shape, ignore_value, np.uint8)
    masks, labels = [], []
    for s in segments_info:
        m = ids == int(s["id"])
        if s["isthing"]:
            sem[m] = 0
            if not s.get("iscrowd", 0):
                masks.append(m.astype(np.uint8))
                labels.append(int(s["label"]))
        else:
            sem[m] = int(s["label"])
    return sem, masks, labels


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(G, H, W) masks -> (G, 4) tight xyxy boxes (pixel edges: x2 = last column + 1)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        boxes[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return boxes


class PanopticDatasetMapper:
    """Record -> model input (see the module doc). Training: shortest edge resized to a size
    drawn from ``min_size_train`` (long edge capped at ``max_size_train``; the semantic map and
    masks nearest), horizontal flip and optional colour jitter; instance boxes are the tight
    boxes of the augmented masks. Evaluation: the original image and the ground truth's file.
    """

    def __init__(
        self, is_train: bool, *, min_size_train: Sequence[int] = (800,),
        max_size_train: int = 1333, min_size_sampling: str = "choice", resize: bool = True,
        hflip_prob: float = 0.5, photometric: bool = False, photometric_prob: float = 0.8,
        brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
        hue: float = 0.02, ignore_value: int = 255, skip_missing_images: bool = False,
    ) -> None:
        if min_size_sampling not in ("choice", "range"):
            raise ValueError(f"min_size_sampling must be 'choice' or 'range': {min_size_sampling}")
        self.is_train = is_train
        self.min_size_train = tuple(int(s) for s in min_size_train)
        self.max_size_train, self.min_size_sampling = int(max_size_train), min_size_sampling
        self.resize = resize and bool(self.min_size_train)
        self.hflip_prob = float(hflip_prob)
        self.photometric, self.photometric_prob = photometric, photometric_prob
        self.jitter = (brightness, contrast, saturation, hue)
        self.ignore_value = int(ignore_value)
        self.skip_missing_images = skip_missing_images
        self.unreadable: dict[str, str] = {}  # file -> why (MapDataset reads it)

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool) -> PanopticDatasetMapper:
        p = cfg.INPUT.PHOTOMETRIC
        return cls(
            is_train, min_size_train=cfg.INPUT.MIN_SIZE_TRAIN,
            max_size_train=cfg.INPUT.MAX_SIZE_TRAIN,
            min_size_sampling=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            hflip_prob=cfg.INPUT.HFLIP_PROB, photometric=p.ENABLED, photometric_prob=p.PROB,
            brightness=p.BRIGHTNESS, contrast=p.CONTRAST, saturation=p.SATURATION, hue=p.HUE,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            skip_missing_images=cfg.DATALOADER.SKIP_MISSING_IMAGES,
        )

    def _transforms(self, h: int, w: int, rng: np.random.Generator) -> A.Compose:
        ops: list[A.BasicTransform] = []
        if self.resize:
            short = draw_short_edge(self.min_size_train, self.min_size_sampling, rng)
            nh, nw = train_resized_shape(h, w, short, self.max_size_train)
            ops.append(A.Resize(nh, nw, mask_interpolation=0))  # cv2.INTER_NEAREST
        if rng.random() < self.hflip_prob:
            ops.append(A.HorizontalFlip(p=1.0))
        if self.photometric:
            b, c, s, hue = self.jitter
            ops.append(A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=hue,
                                     p=self.photometric_prob))
        return A.Compose(ops, seed=int(rng.integers(2**31 - 1)))

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict | None:
        name = record["file_name"]
        if name in self.unreadable:
            return None
        try:
            image = read_image(name)
        except ImageReadError as e:
            if not self.skip_missing_images:
                raise
            self.unreadable[name] = str(e)
            logger.warning("Skipping image_id %s: %s", record.get("image_id"), e)
            return None
        h, w = image.shape[:2]
        out: dict[str, Any] = {"height": h, "width": w, "image_id": record.get("image_id"),
                               "file_name": name}
        if not self.is_train:
            out["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            out["pan_seg_file_name"] = record["pan_seg_file_name"]
            out["segments_info"] = record["segments_info"]
            return out
        source = record["pan_seg_file_name"]
        ids = read_panoptic_png(source)
        if ids.shape != (h, w):
            raise ValueError(f"Panoptic PNG {source} is {ids.shape[0]}x{ids.shape[1]} (HxW) but "
                             f"its image {name} is {h}x{w}")
        sem, masks, labels = panoptic_targets(ids, record["segments_info"], source=source,
                                              ignore_value=self.ignore_value)
        rng = rng if rng is not None else np.random.default_rng()
        res = self._transforms(h, w, rng)(image=image, masks=[sem, *masks])
        image = res["image"]
        nh, nw = image.shape[:2]
        sem = np.asarray(res["masks"][0])
        inst = (np.stack([np.asarray(m, np.uint8) for m in res["masks"][1:]])
                if masks else np.zeros((0, nh, nw), np.uint8))
        keep = inst.reshape(len(inst), nh * nw).any(axis=1)  # a resize can erase a sliver
        inst = inst[keep]
        out["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["instances"] = {
            "boxes": torch.from_numpy(_mask_boxes(inst)),
            "labels": torch.as_tensor(np.asarray(labels, np.int64)[keep], dtype=torch.int64),
            "masks": torch.from_numpy(np.ascontiguousarray(inst)),
            "sem_seg": torch.from_numpy(sem.astype(np.int64)),
        }
        return out


def register_coco_panoptic(name: str, json_file: Any, image_root: Any, panoptic_root: Any,
                           metadata: dict[str, Any] | None = None) -> None:
    """Register a COCO panoptic json, its image folder and its PNG folder under ``name`` (paths
    or callables resolved at load time), for ``DATASETS.TRAIN`` / ``TEST``."""
    from detection.data.catalog import register_dataset

    def resolve(p: Any) -> Path:
        return Path(p() if callable(p) else p).expanduser()

    def load() -> list[dict]:
        return load_coco_panoptic_json(resolve(json_file), resolve(image_root),
                                       resolve(panoptic_root))[0]

    def load_meta() -> dict[str, Any]:
        jf = resolve(json_file)
        meta = panoptic_metadata(read_coco_json(jf).get("categories", []))
        meta.update(json_file=str(jf.resolve()), image_root=str(resolve(image_root).resolve()),
                    panoptic_root=str(resolve(panoptic_root).resolve()), name=name,
                    **(metadata or {}))
        return meta

    register_dataset(name, load, load_meta)
