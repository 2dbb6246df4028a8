"""Building a detector from a config: the only place that reads ``cfg.MODEL``."""

import inspect
from typing import Any, Dict, List, Optional, Tuple

from fvcore.common.config import CfgNode
from torch import nn

import backbones
from backbones import FPN, ShapeSpec, make_stage
from backbones.base import Backbone

from .anchors import AnchorGenerator
from .box_ops import BoxCoder, LinearBoxCoder
from .cascade import CascadeROIHeads
from .faster_rcnn import GeneralizedRCNN
from .fcos import BOX_LOSSES as FCOS_BOX_LOSSES
from .fcos import FCOS, FCOSHead
from .keypoint_head import KeypointRCNNHead
from .matcher import ATSSMatcher, Matcher
from .metadata import Metadata
from .poolers import ROIPooler
from .preprocess import Preprocessor
from .registry import ROI_BOX_HEADS, ROI_HEADS, RPN_HEADS
from .retinanet import RetinaNet, RetinaNetHead
from .roi_heads import FastRCNNConvFCHead, FastRCNNPredictor, Res5BoxHead, StandardROIHeads
from .rpn import RPN, RPNHead

LEVEL_MAPPINGS = {"detectron2": (1e-8, True), "torchvision": (1e-6, False)}


def _norm(name: str) -> str:
    return name if name else "none"


# The names configs used before any registered backbone could be named: a ResNet of
# MODEL.RESNETS.DEPTH / NUM_GROUPS / WIDTH_PER_GROUP, with the neck each implies.
LEGACY_BACKBONE_NAMES = {"resnet": "none", "resnet_fpn": "fpn"}
NECKS = ("fpn", "none")


def resolve_backbone(cfg: CfgNode) -> Tuple[str, str, Dict[str, Any]]:
    """(registered backbone name, neck, builder options) that ``MODEL.BACKBONE`` names.

    ``NAME`` is any name in ``backbones.list_backbones()`` ("resnet50", "resnet50d",
    "resnext101_32x8d", one of your own registered with ``@backbones.register_backbone``), or
    a legacy "resnet" / "resnet_fpn", which picks the ResNet of ``MODEL.RESNETS.DEPTH``,
    ``NUM_GROUPS`` and ``WIDTH_PER_GROUP`` (read only then) and implies the neck.
    ``NECK`` is "fpn" or "none"; empty means what a legacy name implies, else "none".
    """
    b, r = cfg.MODEL.BACKBONE, cfg.MODEL.RESNETS
    name, neck = b.NAME, b.NECK.lower()
    options: Dict[str, Any] = {}
    if name in LEGACY_BACKBONE_NAMES:
        implied = LEGACY_BACKBONE_NAMES[name]
        if neck and neck != implied:
            raise ValueError(f"MODEL.BACKBONE.NAME {name!r} implies MODEL.BACKBONE.NECK "
                             f"{implied!r}, got {neck!r}; name a registered backbone "
                             "(e.g. 'resnet50') to choose the neck")
        neck = implied
        try:
            arch = backbones.arch_for_depth(r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP)
        except ValueError as err:
            raise ValueError(f"MODEL.RESNETS.DEPTH: {err}") from None
        if arch is None:  # no registered name for this cardinality/width: override one
            arch = f"resnet{r.DEPTH}"
            options.update(groups=r.NUM_GROUPS, width_per_group=r.WIDTH_PER_GROUP)
        name = arch
    elif name not in backbones.list_backbones():
        raise ValueError(
            f"unknown MODEL.BACKBONE.NAME {name!r}; valid: "
            f"{', '.join(backbones.list_backbones())} (registered backbones; import the module "
            f"that registers yours first), or {', '.join(map(repr, LEGACY_BACKBONE_NAMES))} "
            "with MODEL.RESNETS.DEPTH")
    neck = neck or "none"
    if neck not in NECKS:
        raise ValueError(f"MODEL.BACKBONE.NECK must be one of {', '.join(NECKS)}, got {neck!r}")
    return name, neck, options


def build_backbone_body(cfg: CfgNode, out_features: Optional[List[str]],
                        **overrides: Any) -> Backbone:
    """The backbone ``MODEL.BACKBONE.NAME`` names, without its neck, with outputs
    ``out_features`` (None: the backbone's default). It gets the options of ``MODEL.BACKBONE``
    (``WEIGHTS``, ``FREEZE_AT``) and ``MODEL.RESNETS`` (``NORM``, ``STRIDE_IN_1X1``,
    ``RES5_DILATION``) and ``overrides``, those its builder takes: a builder of your own that
    takes ``**kwargs`` gets them all, one with named parameters only those it names."""
    name, _, options = resolve_backbone(cfg)
    r, b = cfg.MODEL.RESNETS, cfg.MODEL.BACKBONE
    options.update(weights=b.WEIGHTS or None, norm=_norm(r.NORM), freeze_at=b.FREEZE_AT,
                   style="caffe" if r.STRIDE_IN_1X1 else "pytorch",
                   dilations=(1, 1, 1, r.RES5_DILATION))
    if out_features is not None:
        options["out_features"] = list(out_features)
    options.update(overrides)
    builder = backbones.get_backbone_builder(name)
    params = inspect.signature(builder).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params}
        if options.get("weights") and "weights" not in accepted:
            raise ValueError(f"MODEL.BACKBONE.WEIGHTS is set, but backbone {name!r} takes no "
                             "weights argument")
        options = {k: v for k, v in options.items() if k in accepted}
    return builder(**options)


def build_detector_backbone(cfg: CfgNode, *, top_block: str = "maxpool",
                            top_block_in: str = "c5") -> Backbone:
    """The backbone and neck ``MODEL.BACKBONE`` names: with NECK "fpn", an FPN over
    ``MODEL.FPN.IN_FEATURES`` (empty: every output of the backbone) with ``top_block``
    ("maxpool": p6 for Faster R-CNN; "p6p7": RetinaNet's, from ``top_block_in`` "c5" or "p5");
    with "none", the backbone's ``MODEL.RESNETS.OUT_FEATURES`` (res4 for C4)."""
    _, neck, _ = resolve_backbone(cfg)
    if neck == "fpn":
        in_features = list(cfg.MODEL.FPN.IN_FEATURES) or None
        body = build_backbone_body(cfg, in_features)
        return FPN(body, out_channels=cfg.MODEL.FPN.OUT_CHANNELS, in_features=in_features,
                   norm=_norm(cfg.MODEL.FPN.NORM), top_block=top_block,
                   top_block_in=top_block_in)
    return build_backbone_body(cfg, list(cfg.MODEL.RESNETS.OUT_FEATURES))


def build_anchor_generator(cfg: CfgNode, strides: List[int]) -> AnchorGenerator:
    """``MODEL.ANCHOR_GENERATOR`` for levels of ``strides``, read as detectron2 reads it:
    ``SIZES`` holds one list per level, or a single list that every level takes whole
    (``[[32, 64, 128]]`` on five levels: nine anchors per location on each)."""
    a = cfg.MODEL.ANCHOR_GENERATOR
    sizes = [list(s) for s in a.SIZES]
    if len(sizes) == 1:
        sizes = sizes * len(strides)
    if len(sizes) != len(strides):
        raise ValueError(f"MODEL.ANCHOR_GENERATOR.SIZES gives {len(sizes)} levels of sizes for "
                         f"{len(strides)} feature maps")
    return AnchorGenerator(
        sizes=sizes, aspect_ratios=list(a.ASPECT_RATIOS), strides=strides, offset=a.OFFSET,
        round_base=a.ROUND_BASE, ratio_major=a.RATIO_MAJOR, infer_strides=a.INFER_STRIDES,
    )


def build_rpn(cfg: CfgNode, shapes: Dict[str, ShapeSpec]) -> RPN:
    c = cfg.MODEL.RPN
    in_features = list(c.IN_FEATURES)
    channels = {shapes[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"RPN inputs {in_features} must share a channel count, got {channels}")
    in_channels = channels.pop()
    if any(d not in (-1, in_channels) for d in c.CONV_DIMS):
        raise ValueError(f"MODEL.RPN.CONV_DIMS must be -1 or {in_channels}, got {c.CONV_DIMS}")
    generator = build_anchor_generator(cfg, [shapes[f].stride for f in in_features])
    if len(set(generator.num_anchors)) != 1:
        raise ValueError("every RPN level needs the same number of anchors")
    return RPN(
        in_features=in_features,
        head=RPN_HEADS.get(c.HEAD_NAME)(cfg, in_channels, generator.num_anchors[0]),
        anchor_generator=generator,
        box_coder=BoxCoder(c.BBOX_REG_WEIGHTS, c.BBOX_SCALE_CLAMP),
        matcher=Matcher(c.IOU_THRESHOLDS, allow_low_quality_matches=True),
        batch_size_per_image=c.BATCH_SIZE_PER_IMAGE, positive_fraction=c.POSITIVE_FRACTION,
        pre_nms_topk=(c.PRE_NMS_TOPK_TRAIN, c.PRE_NMS_TOPK_TEST),
        post_nms_topk=(c.POST_NMS_TOPK_TRAIN, c.POST_NMS_TOPK_TEST),
        nms_thresh=c.NMS_THRESH, min_box_size=c.MIN_SIZE, smooth_l1_beta=c.SMOOTH_L1_BETA,
        loss_normalizer=c.LOSS_NORMALIZER, loss_weight=c.LOSS_WEIGHT,
    )


def _pooler(cfg: CfgNode, strides) -> ROIPooler:
    b = cfg.MODEL.ROI_BOX_HEAD
    if b.POOLER_TYPE not in ("ROIAlign", "ROIAlignV2"):
        raise ValueError(f"MODEL.ROI_BOX_HEAD.POOLER_TYPE must be 'ROIAlign' or 'ROIAlignV2', "
                         f"got {b.POOLER_TYPE!r}")
    if b.POOLER_LEVEL_MAPPING not in LEVEL_MAPPINGS:
        raise ValueError(f"MODEL.ROI_BOX_HEAD.POOLER_LEVEL_MAPPING must be one of "
                         f"{sorted(LEVEL_MAPPINGS)}, got {b.POOLER_LEVEL_MAPPING!r}")
    eps, inside = LEVEL_MAPPINGS[b.POOLER_LEVEL_MAPPING]
    return ROIPooler(output_size=b.POOLER_RESOLUTION, strides=strides,
                     sampling_ratio=b.POOLER_SAMPLING_RATIO,
                     aligned=b.POOLER_TYPE == "ROIAlignV2", eps=eps, eps_inside_log=inside)


def roi_heads_options(cfg: CfgNode, shapes: Dict[str, ShapeSpec]) -> Dict[str, Any]:
    """The options of ``MODEL.ROI_HEADS`` and ``MODEL.ROI_BOX_HEAD`` that every RoI heads take:
    features, pooler, sampling, loss and inference settings."""
    h, b = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
    in_features = list(h.IN_FEATURES)
    return dict(
        in_features=in_features, pooler=_pooler(cfg, [shapes[f].stride for f in in_features]),
        num_classes=h.NUM_CLASSES, batch_size_per_image=h.BATCH_SIZE_PER_IMAGE,
        positive_fraction=h.POSITIVE_FRACTION, proposal_append_gt=h.PROPOSAL_APPEND_GT,
        smooth_l1_beta=b.SMOOTH_L1_BETA, score_thresh=h.SCORE_THRESH_TEST,
        nms_thresh=h.NMS_THRESH_TEST, detections_per_image=h.DETECTIONS_PER_IMAGE,
        min_box_size=h.MIN_BOX_SIZE,
    )


def build_roi_heads(cfg: CfgNode, shapes: Dict[str, ShapeSpec],
                    res5: Optional[nn.Sequential] = None,
                    mask_head: Optional[nn.Module] = None) -> StandardROIHeads:
    """``StandardROIHeads`` with a conv/FC box head (FPN) or, for "Res5ROIHeads", with res5 as
    the box head (pass the stage built for it, or one is built); a ``MODEL.ROI_HEADS.NAME``
    whose builder makes whole RoI heads ("CascadeROIHeads") gets them as they are built."""
    h, b = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
    box_head = ROI_HEADS.get(h.NAME)(cfg, shapes, list(h.IN_FEATURES), res5)
    if isinstance(box_head, StandardROIHeads):
        box_head.mask_head = mask_head
        return box_head
    if len(h.IOU_THRESHOLDS) != 1:
        raise ValueError("MODEL.ROI_HEADS.IOU_THRESHOLDS takes one threshold")
    thresh = h.IOU_THRESHOLDS[0]
    return StandardROIHeads(
        **roi_heads_options(cfg, shapes), box_head=box_head,
        box_predictor=FastRCNNPredictor(box_head.out_dim, h.NUM_CLASSES),
        box_coder=BoxCoder(b.BBOX_REG_WEIGHTS, b.BBOX_SCALE_CLAMP),
        matcher=Matcher((thresh, thresh), allow_low_quality_matches=False), mask_head=mask_head,
    )


@RPN_HEADS.register("StandardRPNHead")
def _standard_rpn_head(cfg: CfgNode, in_channels: int, num_anchors: int) -> nn.Module:
    """detectron2's StandardRPNHead: ``len(MODEL.RPN.CONV_DIMS)`` shared 3x3 convs, then the
    1x1 objectness and box-delta predictors."""
    return RPNHead(in_channels, num_anchors, num_convs=len(cfg.MODEL.RPN.CONV_DIMS))


@ROI_HEADS.register("StandardROIHeads")
def _standard_roi_box_head(cfg: CfgNode, shapes: Dict[str, ShapeSpec], in_features: List[str],
                           res5: Optional[nn.Sequential]) -> nn.Module:
    """FPN's RoI heads: the box head ``MODEL.ROI_BOX_HEAD.NAME`` names, on pooled features."""
    return ROI_BOX_HEADS.get(cfg.MODEL.ROI_BOX_HEAD.NAME)(cfg, shapes[in_features[0]].channels)


@ROI_HEADS.register("Res5ROIHeads")
def _res5_roi_box_head(cfg: CfgNode, shapes: Dict[str, ShapeSpec], in_features: List[str],
                       res5: Optional[nn.Sequential]) -> nn.Module:
    """C4's RoI heads: res5 as the box head (the backbone's, taken out of it, or a new one)."""
    if len(in_features) != 1:
        raise ValueError(f"Res5ROIHeads pools one feature map, got {in_features}")
    if res5 is None:
        r = cfg.MODEL.RESNETS
        res5 = make_stage("bottleneck", 3, shapes[in_features[0]].channels, 512, stride=2,
                          norm=r.NORM, groups=r.NUM_GROUPS, width_per_group=r.WIDTH_PER_GROUP,
                          stride_in_1x1=r.STRIDE_IN_1X1)
    return Res5BoxHead(res5, 512 * type(res5[-1]).expansion)


@ROI_HEADS.register("CascadeROIHeads")
def build_cascade_roi_heads(cfg: CfgNode, shapes: Dict[str, ShapeSpec], in_features: List[str],
                            res5: Optional[nn.Sequential]) -> CascadeROIHeads:
    """Cascade R-CNN's RoI heads (detectron2's): one box head (``MODEL.ROI_BOX_HEAD.NAME``)
    and class-agnostic predictor per stage, ``MODEL.ROI_BOX_CASCADE_HEAD.IOUS`` and
    ``BBOX_REG_WEIGHTS`` giving the stages' IoUs and box coding."""
    h, b, c = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_BOX_CASCADE_HEAD
    ious, weights = [float(t) for t in c.IOUS], [tuple(w) for w in c.BBOX_REG_WEIGHTS]
    if len(ious) != len(weights) or not ious:
        raise ValueError(f"MODEL.ROI_BOX_CASCADE_HEAD: IOUS gives {len(ious)} stages, "
                         f"BBOX_REG_WEIGHTS {len(weights)}; one of each per stage")
    if list(h.IOU_THRESHOLDS) != [ious[0]]:
        raise ValueError(f"MODEL.ROI_HEADS.IOU_THRESHOLDS {list(h.IOU_THRESHOLDS)} must be the "
                         f"first stage's IoU, [{ious[0]}] (MODEL.ROI_BOX_CASCADE_HEAD.IOUS)")
    box_heads = [ROI_BOX_HEADS.get(b.NAME)(cfg, shapes[in_features[0]].channels) for _ in ious]
    return CascadeROIHeads(
        **roi_heads_options(cfg, shapes), box_heads=box_heads,
        box_predictors=[FastRCNNPredictor(head.out_dim, h.NUM_CLASSES, class_agnostic=True)
                        for head in box_heads],
        box_coders=[BoxCoder(w, b.BBOX_SCALE_CLAMP) for w in weights], stage_ious=ious,
    )


@ROI_BOX_HEADS.register("FastRCNNConvFCHead")
def _conv_fc_box_head(cfg: CfgNode, in_channels: int) -> nn.Module:
    """``NUM_CONV`` convs and ``NUM_FC`` fully connected layers (detectron2's)."""
    b = cfg.MODEL.ROI_BOX_HEAD
    return FastRCNNConvFCHead(in_channels=in_channels, resolution=b.POOLER_RESOLUTION,
                              conv_dims=[b.CONV_DIM] * b.NUM_CONV, fc_dims=[b.FC_DIM] * b.NUM_FC,
                              norm=_norm(b.NORM))


def build_metadata(cfg: CfgNode, num_classes: Optional[int] = None) -> Metadata:
    """Class names and dataset ids: ``MODEL.CLASS_NAMES`` / ``CATEGORY_IDS``, else COCO's for
    80 (detectron2) or 90 (torchvision) classes, else ``class_{k}``. ``num_classes`` defaults
    to ``MODEL.ROI_HEADS.NUM_CLASSES``."""
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES if num_classes is None else num_classes
    if cfg.MODEL.CLASS_NAMES:
        return Metadata(class_names=list(cfg.MODEL.CLASS_NAMES),
                        category_ids=list(cfg.MODEL.CATEGORY_IDS))
    if k == 80:
        return Metadata.coco()
    if k == 90:
        return Metadata.torchvision_coco()
    return Metadata(class_names=[f"class_{i}" for i in range(k)])


def build_preprocessor(cfg: CfgNode, size_divisibility: int) -> Preprocessor:
    mode = cfg.INPUT.RESIZE_MODE
    return Preprocessor(
        pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
        input_format=cfg.MODEL.INPUT_FORMAT, min_size_test=cfg.INPUT.MIN_SIZE_TEST,
        max_size_test=cfg.INPUT.MAX_SIZE_TEST, min_size_train=cfg.INPUT.MIN_SIZE_TRAIN,
        max_size_train=cfg.INPUT.MAX_SIZE_TRAIN,
        resize_mode="detectron2" if mode == "shortest_edge" else mode,
        resize_in_train=cfg.INPUT.RESIZE_IN_MODEL_TRAIN, size_divisibility=size_divisibility,
    )


def build_keypoint_head(cfg: CfgNode, shapes: Dict[str, ShapeSpec]) -> KeypointRCNNHead:
    """The keypoint head of ``MODEL.ROI_KEYPOINT_HEAD`` on ``MODEL.ROI_HEADS.IN_FEATURES``, with
    the box pooler's level rule."""
    k, h = cfg.MODEL.ROI_KEYPOINT_HEAD, cfg.MODEL.ROI_HEADS
    if k.POOLER_TYPE not in ("ROIAlign", "ROIAlignV2"):
        raise ValueError(f"MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE must be 'ROIAlign' or "
                         f"'ROIAlignV2', got {k.POOLER_TYPE!r}")
    in_features = list(h.IN_FEATURES)
    eps, inside = LEVEL_MAPPINGS[cfg.MODEL.ROI_BOX_HEAD.POOLER_LEVEL_MAPPING]
    pooler = ROIPooler(output_size=k.POOLER_RESOLUTION,
                       strides=[shapes[f].stride for f in in_features],
                       sampling_ratio=k.POOLER_SAMPLING_RATIO,
                       aligned=k.POOLER_TYPE == "ROIAlignV2", eps=eps, eps_inside_log=inside)
    return KeypointRCNNHead(
        in_features=in_features, pooler=pooler, in_channels=shapes[in_features[0]].channels,
        num_classes=h.NUM_CLASSES, num_keypoints=k.NUM_KEYPOINTS,
        conv_dims=list(k.CONV_DIMS), loss_weight=k.LOSS_WEIGHT,
        normalize_by_visible=k.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS,
        loss_normalizer=h.BATCH_SIZE_PER_IMAGE * h.POSITIVE_FRACTION * k.NUM_KEYPOINTS,
        coordinate_offset=k.COORDINATE_OFFSET,
    )


def build_model(cfg: CfgNode, *, mask_head: Optional[nn.Module] = None) -> GeneralizedRCNN:
    """The detector described by ``cfg`` (random heads; ImageNet backbone weights when
    ``MODEL.BACKBONE.WEIGHTS`` names them). ``MODEL.WEIGHTS`` is loaded by ``load_model``.
    The family table (``detection.families``) decides which builder a config means; families
    built on this detector (Mask R-CNN, Panoptic FPN) call it with their own config. With
    ``MODEL.KEYPOINT_ON`` the RoI heads get a keypoint head (Keypoint R-CNN, FPN only)."""
    keypoint_on = cfg.MODEL.get("KEYPOINT_ON", False)
    if keypoint_on and (cfg.MODEL.ROI_HEADS.NAME != "StandardROIHeads"
                        or cfg.MODEL.get("MASK_ON", False)):
        raise ValueError("MODEL.KEYPOINT_ON is supported with MODEL.ROI_HEADS.NAME "
                         "'StandardROIHeads' (FPN) and without MODEL.MASK_ON; got "
                         f"{cfg.MODEL.ROI_HEADS.NAME!r}, MASK_ON {cfg.MODEL.get('MASK_ON', False)}")
    res5 = None
    if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads":
        backbone = build_backbone_body(cfg, ["res2", "res3", "res4", "res5"])
        res5 = split_res5(backbone)
    else:
        backbone = build_detector_backbone(cfg)
    shapes = backbone.output_shape()
    model = GeneralizedRCNN(
        preprocessor=build_preprocessor(cfg, backbone.size_divisibility),
        backbone=backbone, rpn=build_rpn(cfg, shapes),
        roi_heads=build_roi_heads(cfg, shapes, res5=res5, mask_head=mask_head),
        metadata=build_metadata(cfg),
    )
    if keypoint_on:
        model.roi_heads.keypoint_head = build_keypoint_head(cfg, shapes)
    return model.to(cfg.MODEL.DEVICE)


def build_retinanet(cfg: CfgNode) -> RetinaNet:
    """RetinaNet as ``MODEL.RETINANET`` describes it, on an FPN with RetinaNet's P6/P7 top
    block (random head; ImageNet backbone weights when ``MODEL.BACKBONE.WEIGHTS`` names
    them). ``MODEL.WEIGHTS`` is loaded by the family's loader."""
    r = cfg.MODEL.RETINANET
    if resolve_backbone(cfg)[1] != "fpn":
        raise ValueError("RetinaNet runs on an FPN: set MODEL.BACKBONE.NECK 'fpn' (or NAME "
                         "'resnet_fpn')")
    if r.TOP_BLOCK_IN not in ("c5", "p5"):
        raise ValueError(f"MODEL.RETINANET.TOP_BLOCK_IN must be 'c5' or 'p5', got "
                         f"{r.TOP_BLOCK_IN!r}")
    if list(r.IOU_LABELS) != [0, -1, 1]:
        raise ValueError(f"MODEL.RETINANET.IOU_LABELS must be [0, -1, 1] (background, ignored, "
                         f"foreground), got {list(r.IOU_LABELS)}")
    if r.MATCHER not in ("iou", "atss"):
        raise ValueError(f"MODEL.RETINANET.MATCHER must be 'iou' or 'atss', got {r.MATCHER!r}")
    if len(r.IOU_THRESHOLDS) != 2:
        raise ValueError(f"MODEL.RETINANET.IOU_THRESHOLDS takes (background below, foreground "
                         f"from), got {list(r.IOU_THRESHOLDS)}")
    backbone = build_detector_backbone(cfg, top_block="p6p7", top_block_in=r.TOP_BLOCK_IN)
    shapes = backbone.output_shape()
    in_features = list(r.IN_FEATURES)
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(f"MODEL.RETINANET.IN_FEATURES {missing} are not outputs of the "
                         f"backbone, which gives {list(shapes)}")
    channels = {shapes[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"RetinaNet inputs {in_features} must share a channel count, got "
                         f"{channels}")
    generator = build_anchor_generator(cfg, [shapes[f].stride for f in in_features])
    if len(set(generator.num_anchors)) != 1:
        raise ValueError("every RetinaNet level needs the same number of anchors, got "
                         f"{generator.num_anchors} (MODEL.ANCHOR_GENERATOR)")
    head = RetinaNetHead(in_channels=channels.pop(), num_anchors=generator.num_anchors[0],
                         num_classes=r.NUM_CLASSES, num_convs=r.NUM_CONVS, norm=_norm(r.NORM),
                         prior_prob=r.PRIOR_PROB)
    model = RetinaNet(
        preprocessor=build_preprocessor(cfg, backbone.size_divisibility), backbone=backbone,
        head=head, anchor_generator=generator, in_features=in_features,
        box_coder=BoxCoder(r.BBOX_REG_WEIGHTS),
        matcher=(ATSSMatcher(r.ATSS_TOPK) if r.MATCHER == "atss"
                 else Matcher(r.IOU_THRESHOLDS, allow_low_quality_matches=True)),
        focal_alpha=r.FOCAL_LOSS_ALPHA, focal_gamma=r.FOCAL_LOSS_GAMMA,
        box_loss=r.BBOX_REG_LOSS_TYPE, smooth_l1_beta=r.SMOOTH_L1_LOSS_BETA,
        box_loss_weight=r.BBOX_REG_LOSS_WEIGHT,
        loss_normalizer=r.LOSS_NORMALIZER, score_thresh=r.SCORE_THRESH_TEST,
        topk_candidates=r.TOPK_CANDIDATES_TEST, nms_thresh=r.NMS_THRESH_TEST,
        detections_per_image=r.DETECTIONS_PER_IMAGE,
        metadata=build_metadata(cfg, r.NUM_CLASSES),
    )
    return model.to(cfg.MODEL.DEVICE)


def build_fcos(cfg: CfgNode) -> FCOS:
    """FCOS as ``MODEL.FCOS`` describes it, on an FPN with a P6/P7 top block (random head;
    ImageNet backbone weights when ``MODEL.BACKBONE.WEIGHTS`` names them). Its points are
    squares of each level's stride; of ``MODEL.ANCHOR_GENERATOR`` only ``OFFSET`` and
    ``INFER_STRIDES`` apply. ``MODEL.WEIGHTS`` is loaded by the family's loader."""
    f = cfg.MODEL.FCOS
    if resolve_backbone(cfg)[1] != "fpn":
        raise ValueError("FCOS runs on an FPN: set MODEL.BACKBONE.NECK 'fpn' (or NAME "
                         "'resnet_fpn')")
    if f.TOP_BLOCK_IN not in ("c5", "p5"):
        raise ValueError(f"MODEL.FCOS.TOP_BLOCK_IN must be 'c5' or 'p5', got {f.TOP_BLOCK_IN!r}")
    if f.BOX_REG_LOSS not in FCOS_BOX_LOSSES:
        raise ValueError(f"MODEL.FCOS.BOX_REG_LOSS must be one of {tuple(FCOS_BOX_LOSSES)}, got "
                         f"{f.BOX_REG_LOSS!r}")
    backbone = build_detector_backbone(cfg, top_block="p6p7", top_block_in=f.TOP_BLOCK_IN)
    shapes = backbone.output_shape()
    in_features = list(f.IN_FEATURES)
    missing = [name for name in in_features if name not in shapes]
    if missing:
        raise ValueError(f"MODEL.FCOS.IN_FEATURES {missing} are not outputs of the backbone, "
                         f"which gives {list(shapes)}")
    channels = {shapes[name].channels for name in in_features}
    if len(channels) != 1:
        raise ValueError(f"FCOS inputs {in_features} must share a channel count, got {channels}")
    strides = [shapes[name].stride for name in in_features]
    a = cfg.MODEL.ANCHOR_GENERATOR
    points = AnchorGenerator(sizes=[[s] for s in strides], aspect_ratios=[[1.0]],
                             strides=strides, offset=a.OFFSET, infer_strides=a.INFER_STRIDES)
    head = FCOSHead(in_channels=channels.pop(), num_classes=f.NUM_CLASSES,
                    num_convs=f.NUM_CONVS, norm=_norm(f.HEAD_NORM), prior_prob=f.PRIOR_PROB)
    model = FCOS(
        preprocessor=build_preprocessor(cfg, backbone.size_divisibility), backbone=backbone,
        head=head, points=points, in_features=in_features,
        box_coder=LinearBoxCoder(normalize_by_size=True),
        center_sampling_radius=f.CENTER_SAMPLING_RADIUS, focal_alpha=f.FOCAL_LOSS_ALPHA,
        focal_gamma=f.FOCAL_LOSS_GAMMA, box_loss=f.BOX_REG_LOSS,
        score_thresh=f.SCORE_THRESH_TEST, topk_candidates=f.TOPK_CANDIDATES_TEST,
        nms_thresh=f.NMS_THRESH_TEST, detections_per_image=f.DETECTIONS_PER_IMAGE,
        metadata=build_metadata(cfg, f.NUM_CLASSES),
    )
    return model.to(cfg.MODEL.DEVICE)


def split_res5(body: Backbone) -> nn.Sequential:
    """Take res5 (with any weights it was loaded with) out of a ResNet, which then ends at
    res4: the C4 detector runs res5 as its box head."""
    if not isinstance(body, backbones.ResNet) or "res5" not in body.stage_names:
        raise ValueError(f"MODEL.ROI_HEADS.NAME 'Res5ROIHeads' runs a ResNet's res5 as its box "
                         f"head; MODEL.BACKBONE.NAME builds a {type(body).__name__}")
    return body.pop_last_stage()
