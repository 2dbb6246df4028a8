"""The Panoptic FPN model family: ``MODEL.META_ARCHITECTURE: PanopticFPN``. Its mapper reads
COCO panoptic data (instance targets and the semantic map from the PNGs), PQ scores it, and
its weights are ours or detectron2's ``panoptic_fpn_*``, loaded exactly."""

from pathlib import Path
from typing import Any, Optional

from detection.families import (
    ModelFamily,
    attach_instance_metadata,
    register_family,
    strict_weight_loader,
)

from .build import build_panoptic_fpn
from .convert import to_ours
from .data import PanopticDatasetMapper
from .evaluation import PanopticEvaluator

__all__ = ["PANOPTIC_FPN", "attach_panoptic_metadata"]


def attach_panoptic_metadata(cfg: Any) -> None:
    """The thing classes into ``MODEL.CLASS_NAMES`` / ``CATEGORY_IDS`` (as Mask R-CNN), the
    semantic labels' names ("things", then the stuff classes) into
    ``MODEL.PANOPTIC_FPN.STUFF_CLASS_NAMES``, and ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` checked
    against their count."""
    from detection.data.catalog import get_metadata

    attach_instance_metadata(cfg)
    if not cfg.DATASETS.TRAIN:
        return
    meta = get_metadata(cfg.DATASETS.TRAIN[0])
    stuff = meta.get("stuff_classes")
    if stuff and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != len(stuff):
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} but dataset "
            f"{cfg.DATASETS.TRAIN[0]!r} has {len(stuff) - 1} stuff classes plus 'things'; set it "
            f"to {len(stuff)}")
    if stuff and not cfg.MODEL.PANOPTIC_FPN.STUFF_CLASS_NAMES:
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.MODEL.PANOPTIC_FPN.STUFF_CLASS_NAMES = [str(n) for n in stuff]
        if was_frozen:
            cfg.freeze()


def build_panoptic_evaluator(cfg: Any, dataset_name: str,
                             output_dir: Optional[Path] = None) -> PanopticEvaluator:
    """PQ / SQ / RQ of the merged predictions; the predictions are written in COCO panoptic
    format under ``output_dir``."""
    return PanopticEvaluator.from_dataset(dataset_name, output_dir=output_dir)


PANOPTIC_FPN = register_family(
    ModelFamily(
        name="PanopticFPN",
        build=build_panoptic_fpn,
        load_weights=strict_weight_loader(to_ours),
        build_mapper=PanopticDatasetMapper.from_config,
        build_evaluator=build_panoptic_evaluator,
        attach_metadata=attach_panoptic_metadata,
        declared_by="segmentation",
    )
)
