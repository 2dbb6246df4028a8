"""Semantic segmentation: Semantic FPN, DeepLabV3 and FCN heads on our ResNets, torchvision
checkpoint conversion, label-map data and mIoU evaluation.

    from segmentation.semantic import build_semantic_model
    from segmentation.config import load_config
    cfg = load_config("semantic_fpn_r18_shapes.yaml")
    model = build_semantic_model(cfg).eval()
    logits = model([image_uint8_chw])[0]["sem_seg"]           # (K, H, W)

Its config keys (``MODEL.SEM_SEG_HEAD.*``, ``INPUT.CROP.*``) are declared in
``segmentation.config``; its model family (``family.py``) is registered in detection's family
table on import, so ``META_ARCHITECTURE: SemanticSegmentor`` trains and evaluates through the
shared engine (``tools/train_det.py``).
"""

from .build import (
    build_semantic_backbone,
    build_semantic_head,
    build_semantic_model,
)
from .convert import load_segmentation_weights, torchvision_segmentation_to_ours
from .data import SemanticDatasetMapper, read_label_map, sem_seg_from_coco
from .evaluation import SemSegEvaluator, confusion_matrix, metrics_from_confusion
from .family import SEMANTIC_SEGMENTOR, attach_semantic_metadata
from .heads import ASPP, DeepLabV3Head, FCNHead, SemanticFPNHead
from .model import SemanticSegmentor

__all__ = [
    "ASPP",
    "DeepLabV3Head",
    "FCNHead",
    "SEMANTIC_SEGMENTOR",
    "SemSegEvaluator",
    "SemanticDatasetMapper",
    "SemanticFPNHead",
    "SemanticSegmentor",
    "attach_semantic_metadata",
    "build_semantic_backbone",
    "build_semantic_head",
    "build_semantic_model",
    "confusion_matrix",
    "load_segmentation_weights",
    "metrics_from_confusion",
    "read_label_map",
    "sem_seg_from_coco",
    "torchvision_segmentation_to_ours",
]

