"""Mask R-CNN from a config: the ``MODEL.MASK_ON`` / ``MODEL.ROI_MASK_HEAD.*`` keys and the
builder (the only place here that reads the config)."""

import logging
from typing import Any

from fvcore.common.config import CfgNode
from torch import nn

from detection.modeling.build import LEVEL_MAPPINGS, build_model
from detection.modeling.convert import load_state_dict
from detection.modeling.poolers import ROIPooler

from .mask_head import MaskRCNNHead
from .model import MaskPreprocessor, MaskRCNN
from .paste import PASTE_MODES

logger = logging.getLogger(__name__)

MASK_HEAD_NAMES = ("MaskRCNNConvUpsampleHead",)


def add_mask_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.MASK_ON`` and ``MODEL.ROI_MASK_HEAD`` (detectron2's names and defaults;
    the torchvision configs choose its conventions) unless present; returns ``cfg``."""
    if "MASK_ON" not in cfg.MODEL:
        cfg.MODEL.MASK_ON = False
    if "ROI_MASK_HEAD" in cfg.MODEL:
        return cfg
    h = CfgNode()
    h.NAME = "MaskRCNNConvUpsampleHead"
    h.NUM_CONV = 4
    h.CONV_DIM = 256
    h.NORM = ""  # torchvision v2: "BN"
    h.POOLER_RESOLUTION = 14  # masks are twice this
    h.POOLER_SAMPLING_RATIO = 0  # torchvision: 2
    h.POOLER_TYPE = "ROIAlignV2"  # aligned (also when cropping targets); torchvision "ROIAlign"
    h.CLS_AGNOSTIC_MASK = False
    # How masks are pasted into the image: "detectron2" (grid sampling at pixel centres) or
    # "torchvision" (padded mask resized into the integer box).
    h.PASTE_MODE = "detectron2"
    h.MASK_THRESHOLD = 0.5
    cfg.MODEL.ROI_MASK_HEAD = h
    return cfg


def build_mask_head(cfg: CfgNode, shapes: dict) -> MaskRCNNHead:
    """The mask head on ``MODEL.ROI_HEADS.IN_FEATURES`` with the box pooler's level rule."""
    h = cfg.MODEL.ROI_MASK_HEAD
    if h.NAME not in MASK_HEAD_NAMES:
        raise ValueError(f"unknown MODEL.ROI_MASK_HEAD.NAME {h.NAME!r}; valid: {MASK_HEAD_NAMES}")
    if h.POOLER_TYPE not in ("ROIAlign", "ROIAlignV2"):
        raise ValueError(f"MODEL.ROI_MASK_HEAD.POOLER_TYPE must be 'ROIAlign' or 'ROIAlignV2', "
                         f"got {h.POOLER_TYPE!r}")
    in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    eps, inside = LEVEL_MAPPINGS[cfg.MODEL.ROI_BOX_HEAD.POOLER_LEVEL_MAPPING]
    aligned = h.POOLER_TYPE == "ROIAlignV2"
    pooler = ROIPooler(output_size=h.POOLER_RESOLUTION,
                       strides=[shapes[f].stride for f in in_features],
                       sampling_ratio=h.POOLER_SAMPLING_RATIO, aligned=aligned, eps=eps,
                       eps_inside_log=inside)
    return MaskRCNNHead(
        in_features=in_features, pooler=pooler, in_channels=shapes[in_features[0]].channels,
        num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES, conv_dims=[h.CONV_DIM] * h.NUM_CONV,
        norm=h.NORM or "none", cls_agnostic=h.CLS_AGNOSTIC_MASK, target_aligned=aligned,
    )


def build_mask_rcnn(cfg: CfgNode) -> MaskRCNN:
    """Mask R-CNN: detection's ``build_model`` (backbone, RPN, box head) with a mask head."""
    h = cfg.MODEL.ROI_MASK_HEAD
    if h.PASTE_MODE not in PASTE_MODES:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.PASTE_MODE must be one of {PASTE_MODES}, got "
                         f"{h.PASTE_MODE!r}")
    if cfg.MODEL.ROI_HEADS.NAME != "StandardROIHeads":
        raise ValueError("Mask R-CNN is built on FPN: MODEL.ROI_HEADS.NAME must be "
                         f"'StandardROIHeads', got {cfg.MODEL.ROI_HEADS.NAME!r}")
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    det = build_model(cfg)
    det.roi_heads.mask_head = build_mask_head(cfg, det.backbone.output_shape())
    model = MaskRCNN(
        preprocessor=MaskPreprocessor.from_preprocessor(det.preprocessor),
        backbone=det.backbone, rpn=det.rpn, roi_heads=det.roi_heads, metadata=det.metadata,
        paste_mode=h.PASTE_MODE, mask_threshold=h.MASK_THRESHOLD,
    )
    return model.to(cfg.MODEL.DEVICE)


def wants_masks(cfg: Any) -> bool:
    """Whether ``cfg`` describes a Mask R-CNN."""
    return cfg.MODEL.META_ARCHITECTURE == "MaskRCNN" or bool(cfg.MODEL.get("MASK_ON", False))


def build_rcnn(cfg: CfgNode) -> nn.Module:
    """Mask R-CNN when ``MODEL.MASK_ON``, else detection's Faster R-CNN."""
    return build_mask_rcnn(cfg) if wants_masks(cfg) else build_model(cfg)


def load_mask_rcnn_weights(model: nn.Module, weights: str) -> None:
    """Load ``MODEL.WEIGHTS`` (zoo name, URL or path; ours, torchvision's or detectron2's
    format) into a built Mask R-CNN, every key used."""
    from detection.modeling.predictor import read_weights

    from .convert import to_ours

    if not weights:
        return
    try:
        load_state_dict(model, to_ours(read_weights(weights)))
    except (KeyError, ValueError) as e:
        raise type(e)(f"{weights}: {e}") from e
    logger.info("Loaded weights from %s", weights)
