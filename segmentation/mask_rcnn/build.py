"""Mask R-CNN from a config: the builder (the only place here that reads the config; the keys
``MODEL.ROI_MASK_HEAD.*`` are declared in ``segmentation.config``)."""

import logging

from fvcore.common.config import CfgNode

from detection.modeling.build import LEVEL_MAPPINGS, build_model
from detection.modeling.poolers import ROIPooler

from .mask_head import MaskRCNNHead
from .model import MaskPreprocessor, MaskRCNN
from .paste import PASTE_MODES

logger = logging.getLogger(__name__)

MASK_HEAD_NAMES = ("MaskRCNNConvUpsampleHead",)


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
    """Mask R-CNN: detection's ``build_model`` (backbone, RPN, box head) with a mask head;
    with ``MODEL.ROI_HEADS.NAME: CascadeROIHeads``, Cascade Mask R-CNN."""
    h = cfg.MODEL.ROI_MASK_HEAD
    if h.PASTE_MODE not in PASTE_MODES:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.PASTE_MODE must be one of {PASTE_MODES}, got "
                         f"{h.PASTE_MODE!r}")
    if cfg.MODEL.ROI_HEADS.NAME not in ("StandardROIHeads", "CascadeROIHeads"):
        raise ValueError("Mask R-CNN is built on FPN: MODEL.ROI_HEADS.NAME must be "
                         "'StandardROIHeads' or 'CascadeROIHeads' (Cascade Mask R-CNN), got "
                         f"{cfg.MODEL.ROI_HEADS.NAME!r}")
    det = build_model(cfg)
    det.roi_heads.mask_head = build_mask_head(cfg, det.backbone.output_shape())
    model = MaskRCNN(
        preprocessor=MaskPreprocessor.from_preprocessor(det.preprocessor),
        backbone=det.backbone, rpn=det.rpn, roi_heads=det.roi_heads, metadata=det.metadata,
        paste_mode=h.PASTE_MODE, mask_threshold=h.MASK_THRESHOLD,
    )
    return model.to(cfg.MODEL.DEVICE)
