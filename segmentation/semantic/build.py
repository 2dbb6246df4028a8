"""Building a semantic segmenter from a config (the only place that reads
``cfg.MODEL.SEM_SEG_HEAD``, whose keys ``segmentation.config`` declares).

``MODEL.META_ARCHITECTURE: "SemanticSegmentor"`` selects this model (``family.py``);
``MODEL.BACKBONE.NAME`` / ``NECK`` pick the body: with the FPN neck ("resnet_fpn"), p2..p5
for SemSegFPNHead; without ("resnet"), dilated by ``MODEL.RESNETS.RES4_DILATION`` /
``RES5_DILATION``, for DeepLabV3Head and FCNHead.
"""

from typing import Dict, List, Optional

from fvcore.common.config import CfgNode
from torch import nn

import backbones
from backbones import FPN, ShapeSpec
from detection.modeling.build import build_backbone_body, resolve_backbone

from .heads import DeepLabV3Head, FCNHead, SemanticFPNHead
from .model import SemanticSegmentor

__all__ = ["HEADS", "build_semantic_backbone", "build_semantic_head", "build_semantic_model",
           "semantic_class_names"]

HEADS = ("SemSegFPNHead", "DeepLabV3Head", "FCNHead")


def _norm(name: str) -> str:
    return name if name else "none"


def build_semantic_backbone(cfg: CfgNode) -> backbones.Backbone:
    """The backbone ``MODEL.BACKBONE`` names (``detection``'s resolution of names and necks):
    with NECK "fpn" an FPN without top block over ``MODEL.FPN.IN_FEATURES``; with "none" the
    backbone's outputs the head reads, dilated by ``MODEL.RESNETS.RES4_DILATION`` /
    ``RES5_DILATION``."""
    r, h = cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD
    _, neck, _ = resolve_backbone(cfg)
    dilation = dict(dilations=(1, 1, r.RES4_DILATION, r.RES5_DILATION),
                    dilation_mode=r.DILATION_MODE)
    if neck == "fpn":
        in_features = list(cfg.MODEL.FPN.IN_FEATURES) or None
        body = build_backbone_body(cfg, in_features, **dilation)
        return FPN(body, out_channels=cfg.MODEL.FPN.OUT_CHANNELS, in_features=in_features,
                   norm=_norm(cfg.MODEL.FPN.NORM), top_block=None)
    wanted: List[str] = list(h.IN_FEATURES)
    if h.AUX_LOSS and h.AUX_IN_FEATURE not in wanted:
        wanted.append(h.AUX_IN_FEATURE)
    order = ["res2", "res3", "res4", "res5"]
    bad = [f for f in wanted if f not in order]
    if bad:
        raise ValueError(f"MODEL.SEM_SEG_HEAD features {bad} are not ResNet stages {order}")
    wanted.sort(key=order.index)
    return build_backbone_body(cfg, wanted, **dilation)


def build_semantic_head(
    cfg: CfgNode, shapes: Dict[str, ShapeSpec], in_features: Optional[List[str]] = None,
    name: Optional[str] = None,
) -> nn.Module:
    """The head ``MODEL.SEM_SEG_HEAD.NAME`` (or ``name``) over ``in_features``."""
    h = cfg.MODEL.SEM_SEG_HEAD
    name = name or h.NAME
    in_features = list(in_features or h.IN_FEATURES)
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not backbone outputs "
                         f"{list(shapes)}")
    if name == "SemSegFPNHead":
        return SemanticFPNHead({f: shapes[f] for f in in_features}, num_classes=h.NUM_CLASSES,
                               conv_dims=h.CONVS_DIM, common_stride=h.COMMON_STRIDE,
                               norm=_norm(h.NORM))
    if len(in_features) != 1:
        raise ValueError(f"{name} takes one feature map; MODEL.SEM_SEG_HEAD.IN_FEATURES is "
                         f"{in_features}")
    f = in_features[0]
    if name == "DeepLabV3Head":
        return DeepLabV3Head(shapes[f], in_feature=f, num_classes=h.NUM_CLASSES,
                             rates=list(h.ASPP_DILATIONS), channels=h.ASPP_CHANNELS,
                             norm=_norm(h.NORM), dropout=h.ASPP_DROPOUT)
    if name == "FCNHead":
        return FCNHead(shapes[f], in_feature=f, num_classes=h.NUM_CLASSES, norm=_norm(h.NORM),
                       dropout=h.FCN_DROPOUT)
    raise ValueError(f"unknown MODEL.SEM_SEG_HEAD.NAME {name!r}; valid: {', '.join(HEADS)}")


def semantic_class_names(cfg: CfgNode) -> List[str]:
    """``MODEL.CLASS_NAMES`` when it names every class, else class_0..class_{K-1}."""
    k = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    names = list(cfg.MODEL.get("CLASS_NAMES", []) or [])
    return names if len(names) == k else [f"class_{i}" for i in range(k)]


def build_semantic_model(cfg: CfgNode) -> SemanticSegmentor:
    """A ``SemanticSegmentor`` as ``cfg`` describes it, on ``MODEL.DEVICE``."""
    from detection.modeling.metadata import Metadata

    h = cfg.MODEL.SEM_SEG_HEAD
    backbone = build_semantic_backbone(cfg)
    shapes = backbone.output_shape()
    head = build_semantic_head(cfg, shapes)
    aux = None
    if h.AUX_LOSS:
        aux = build_semantic_head(cfg, shapes, [h.AUX_IN_FEATURE], name="FCNHead")
    div = h.SIZE_DIVISIBILITY if h.SIZE_DIVISIBILITY >= 0 else backbone.size_divisibility
    ids = list(cfg.MODEL.get("CATEGORY_IDS", []) or [])
    names = semantic_class_names(cfg)
    model = SemanticSegmentor(
        backbone=backbone, head=head, aux_head=aux, pixel_mean=list(cfg.MODEL.PIXEL_MEAN),
        pixel_std=list(cfg.MODEL.PIXEL_STD), input_format=cfg.MODEL.INPUT_FORMAT,
        size_divisibility=div, ignore_value=h.IGNORE_VALUE, loss_weight=h.LOSS_WEIGHT,
        aux_loss_weight=h.AUX_LOSS_WEIGHT,
        metadata=Metadata(class_names=names,
                          category_ids=ids if len(ids) == len(names) else []),
    )
    return model.to(cfg.MODEL.DEVICE)
