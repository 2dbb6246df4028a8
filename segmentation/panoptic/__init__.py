"""Panoptic segmentation: Panoptic FPN (Mask R-CNN and the Semantic FPN branch on one FPN),
the merge of instances and stuff, PQ evaluation and COCO panoptic data.

    from segmentation.config import load_config
    from segmentation.panoptic import build_panoptic_fpn
    model = build_panoptic_fpn(load_config("panoptic_fpn_r18_shapes.yaml")).eval()
    out = model([image_uint8_chw])[0]   # Mask R-CNN's outputs, sem_seg logits (S + 1, H, W),
                                        # panoptic_seg (H, W) ids, segments_info

Its config keys (``MODEL.PANOPTIC_FPN.*``) are declared in ``segmentation.config``; its model
family (``family.py``) registers ``META_ARCHITECTURE: PanopticFPN`` in detection's family
table on import; its datasets (``datasets.py``: the panoptic shapes set, COCO 2017 panoptic)
are registered in detection's catalog.
"""

from . import datasets  # noqa: F401  (registers the panoptic datasets)
from .build import build_panoptic_fpn
from .convert import detectron2_to_ours, to_ours
from .data import (
    PanopticDatasetMapper,
    load_coco_panoptic_json,
    panoptic_metadata,
    panoptic_targets,
    register_coco_panoptic,
)
from .evaluation import PanopticEvaluator, pq_from_stats, pq_stats
from .family import PANOPTIC_FPN
from .format import PanopticFormatError, id2rgb, read_panoptic_png, rgb2id, write_panoptic_png
from .merge import combine_semantic_and_instances
from .model import PanopticFPN
from .shapes import ensure_panoptic_shapes

__all__ = [
    "PANOPTIC_FPN",
    "PanopticDatasetMapper",
    "PanopticEvaluator",
    "PanopticFPN",
    "PanopticFormatError",
    "build_panoptic_fpn",
    "combine_semantic_and_instances",
    "detectron2_to_ours",
    "ensure_panoptic_shapes",
    "id2rgb",
    "load_coco_panoptic_json",
    "panoptic_metadata",
    "panoptic_targets",
    "pq_from_stats",
    "pq_stats",
    "read_panoptic_png",
    "register_coco_panoptic",
    "rgb2id",
    "to_ours",
    "write_panoptic_png",
]
