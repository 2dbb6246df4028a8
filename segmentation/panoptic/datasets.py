"""Registered panoptic datasets:

- ``panoptic_shapes_train`` / ``panoptic_shapes_val``: the synthetic panoptic shapes set
  (:mod:`segmentation.panoptic.shapes`), generated on first use;
- ``coco_2017_train_panoptic`` / ``coco_2017_val_panoptic``: COCO 2017 panoptic under
  ``<datasets root>/coco/`` (``annotations/panoptic_{split}2017.json``,
  ``annotations/panoptic_{split}2017/`` PNGs and ``{split}2017/`` images).
"""

from __future__ import annotations

from detection.data.catalog import datasets_root

from .data import register_coco_panoptic
from .shapes import ensure_panoptic_shapes

__all__ = ["register_builtin_panoptic"]


def register_builtin_panoptic() -> None:
    for split in ("train", "val"):
        register_coco_panoptic(
            f"panoptic_shapes_{split}",
            lambda s=split: getattr(ensure_panoptic_shapes(), f"{s}_json"),
            lambda s=split: getattr(ensure_panoptic_shapes(), f"{s}_images"),
            lambda s=split: getattr(ensure_panoptic_shapes(), f"{s}_panoptic"))
        register_coco_panoptic(
            f"coco_2017_{split}_panoptic",
            lambda s=split: datasets_root() / "coco" / "annotations" / f"panoptic_{s}2017.json",
            lambda s=split: datasets_root() / "coco" / f"{s}2017",
            lambda s=split: datasets_root() / "coco" / "annotations" / f"panoptic_{s}2017")


register_builtin_panoptic()
