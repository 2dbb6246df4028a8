"""Semantic segmentation: Semantic FPN, DeepLabV3 and FCN heads on our ResNets, torchvision
checkpoint conversion, label-map data and mIoU evaluation.

    from segmentation.semantic import build_semantic_model
    from detection.config import load_config
    cfg = load_config("semantic_fpn_r18_shapes.yaml")
    model = build_semantic_model(cfg).eval()
    logits = model([image_uint8_chw])[0]["sem_seg"]           # (K, H, W)

Importing this package registers its config keys (``MODEL.SEM_SEG_HEAD.*``) with
``detection.config`` and the ``SemanticSegmentor`` meta-architecture with the shared runner, so
``tools/train_det.py`` trains and evaluates it from a config.
"""

from typing import Any, Optional

from .build import (
    add_semantic_config,
    build_semantic_backbone,
    build_semantic_head,
    build_semantic_model,
)
from .convert import load_segmentation_weights, torchvision_segmentation_to_ours
from .data import SemanticDatasetMapper, read_label_map, sem_seg_from_coco
from .evaluation import SemSegEvaluator, confusion_matrix, metrics_from_confusion
from .heads import ASPP, DeepLabV3Head, FCNHead, SemanticFPNHead
from .model import SemanticSegmentor

__all__ = [
    "ASPP",
    "DeepLabV3Head",
    "FCNHead",
    "SemSegEvaluator",
    "SemanticDatasetMapper",
    "SemanticFPNHead",
    "SemanticSegmentor",
    "add_semantic_config",
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


def attach_semantic_metadata(cfg: Any) -> None:
    """``MODEL.CLASS_NAMES`` from the training dataset (``stuff_classes``, or background +
    ``thing_classes`` for a COCO instances set), checked against ``SEM_SEG_HEAD.NUM_CLASSES``
    and ``IGNORE_VALUE``."""
    from detection.data.catalog import get_metadata

    if cfg.MODEL.CLASS_NAMES or not cfg.DATASETS.TRAIN:
        return
    meta = get_metadata(cfg.DATASETS.TRAIN[0])
    names = list(meta.get("stuff_classes") or ["background", *meta.get("thing_classes", [])])
    head = cfg.MODEL.SEM_SEG_HEAD
    if head.NUM_CLASSES != len(names):
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {head.NUM_CLASSES} but dataset "
            f"{cfg.DATASETS.TRAIN[0]!r} has {len(names)} semantic classes ({names[:5]}...); "
            f"set it to {len(names)}"
        )
    if "ignore_label" in meta and int(meta["ignore_label"]) != head.IGNORE_VALUE:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE is {head.IGNORE_VALUE} but dataset "
                         f"{cfg.DATASETS.TRAIN[0]!r} uses {meta['ignore_label']}")
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.CLASS_NAMES = names
    if was_frozen:
        cfg.freeze()


def _build_evaluator(cfg: Any, dataset_name: str, output_dir: Optional[Any] = None):
    head = cfg.MODEL.SEM_SEG_HEAD
    names = list(cfg.MODEL.CLASS_NAMES) if len(cfg.MODEL.CLASS_NAMES) == head.NUM_CLASSES \
        else None
    return SemSegEvaluator(num_classes=head.NUM_CLASSES, ignore_label=head.IGNORE_VALUE,
                           class_names=names, dataset_name=dataset_name, output_dir=output_dir)


def _load_weights(model: Any, weights: str) -> None:
    import logging

    report = load_segmentation_weights(model, weights)
    log = logging.getLogger(__name__)
    log.info("Loaded %s; missing: %d keys, unused: %d keys", weights, len(report.missing),
             len(report.unexpected))
    if report.missing:
        log.warning("Parameters not in %s: %s", weights, report.missing[:10])


def _register() -> None:
    from detection.config import register_config_extender
    from detection.engine.runner import register_meta_architecture

    register_config_extender(add_semantic_config)
    register_meta_architecture(
        "SemanticSegmentor", build_semantic_model, build_mapper=SemanticDatasetMapper.from_config,
        build_evaluator=_build_evaluator, attach_metadata=attach_semantic_metadata,
        load_weights=_load_weights,
    )


_register()
