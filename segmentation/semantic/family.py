"""The semantic segmentation model family: ``MODEL.META_ARCHITECTURE: SemanticSegmentor``
(Semantic FPN, DeepLabV3, FCN). Its own mapper (label maps, crops), mIoU evaluator, class
metadata (``stuff_classes``) and weight loader (ours or torchvision's segmentation files; an
auxiliary head the checkpoint lacks is reported, not an error)."""

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from detection.families import ModelFamily, register_family

from .build import build_semantic_model
from .convert import load_segmentation_weights
from .data import SemanticDatasetMapper
from .evaluation import SemSegEvaluator

__all__ = ["SEMANTIC_SEGMENTOR", "attach_semantic_metadata"]

logger = logging.getLogger(__name__)


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


def build_semantic_evaluator(cfg: Any, dataset_name: str,
                             output_dir: Optional[Path] = None) -> SemSegEvaluator:
    """mIoU, pixel accuracy and per-class IoU over ``SEM_SEG_HEAD.NUM_CLASSES``."""
    head = cfg.MODEL.SEM_SEG_HEAD
    names = list(cfg.MODEL.CLASS_NAMES) if len(cfg.MODEL.CLASS_NAMES) == head.NUM_CLASSES \
        else None
    return SemSegEvaluator(num_classes=head.NUM_CLASSES, ignore_label=head.IGNORE_VALUE,
                           class_names=names, dataset_name=dataset_name, output_dir=output_dir)


def load_semantic_weights(model: nn.Module, weights: str) -> Mapping[str, Any]:
    """Load ``weights`` (our checkpoint, a torchvision segmentation name, URL or file) into
    ``model``; parameters the file lacks are logged. Returns the checkpoint dict it read (our
    checkpoints carry ``metadata``), or {} for a torchvision file."""
    ckpt: Mapping[str, Any] = {}
    source: Any = weights
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt") and path.is_file():
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            ckpt, source = raw, raw["model"]
    report = load_segmentation_weights(model, source)
    logger.info("Loaded %s; missing: %d keys, unused: %d keys", weights, len(report.missing),
                len(report.unexpected))
    if report.missing:
        logger.warning("Parameters not in %s: %s", weights, report.missing[:10])
    return ckpt


def build_semantic_mapper(cfg: Any, is_train: bool) -> SemanticDatasetMapper:
    """The label-map mapper; training crops are ``INPUT.CROP.SIZE`` pixels (type "absolute",
    the only one implemented)."""
    if cfg.INPUT.CROP.TYPE != "absolute":
        raise ValueError(f"INPUT.CROP.TYPE must be 'absolute' (SIZE in pixels), got "
                         f"{cfg.INPUT.CROP.TYPE!r}")
    return SemanticDatasetMapper.from_config(cfg, is_train)


SEMANTIC_SEGMENTOR = register_family(
    ModelFamily(
        name="SemanticSegmentor",
        build=build_semantic_model,
        load_weights=load_semantic_weights,
        build_mapper=build_semantic_mapper,
        build_evaluator=build_semantic_evaluator,
        attach_metadata=attach_semantic_metadata,
        declared_by="segmentation",
    )
)
