"""segmentation's config: detection's defaults tree plus every key segmentation declares, all
in this module.

    from segmentation.config import load_config
    cfg = load_config("mask_rcnn_r18_fpn_shapes.yaml", ["SOLVER.MAX_ITER", "100"])

``get_cfg()`` is detection's ``get_cfg()`` with :func:`add_segmentation_config` applied:
``MODEL.MASK_ON`` and ``MODEL.ROI_MASK_HEAD.*`` (Mask R-CNN), ``MODEL.SEM_SEG_HEAD.*``,
``MODEL.RESNETS.RES4_DILATION`` / ``DILATION_MODE`` and ``INPUT.CROP.*`` (semantic
segmentation), ``MODEL.PANOPTIC_FPN.*`` (Panoptic FPN). Key names and values are
detectron2's; the torchvision configs choose its conventions. Loading a segmentation config
with ``detection.config`` alone is an error that points here.
"""

from __future__ import annotations

import os
from typing import Iterable

from detection.config import CfgNode, ConfigError, ConfigKeyError, ConfigTypeError
from detection.config import get_cfg as detection_get_cfg
from detection.config import load_config as detection_load_config

__all__ = [
    "ConfigError",
    "ConfigKeyError",
    "ConfigTypeError",
    "add_segmentation_config",
    "get_cfg",
    "load_config",
]


def add_segmentation_config(cfg: CfgNode) -> CfgNode:
    """Add segmentation's keys, at their defaults, to detection's tree ``cfg``; returns it."""
    # -- Mask R-CNN
    cfg.MODEL.MASK_ON = False  # with META_ARCHITECTURE "GeneralizedRCNN": Mask R-CNN
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

    # -- semantic segmentation
    s = CfgNode()
    s.NAME = "SemSegFPNHead"  # or "DeepLabV3Head", "FCNHead"
    s.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    s.NUM_CLASSES = 54
    s.IGNORE_VALUE = 255
    s.CONVS_DIM = 128  # SemSegFPNHead's conv width
    s.COMMON_STRIDE = 4  # SemSegFPNHead: levels are brought to this stride
    s.NORM = "GN"  # head norm: "GN", "BN" (torchvision's heads), "SyncBN", "none"
    s.LOSS_WEIGHT = 1.0
    s.ASPP_DILATIONS = [12, 24, 36]  # torchvision's, at output stride 8; (6, 12, 18) at 16
    s.ASPP_CHANNELS = 256
    s.ASPP_DROPOUT = 0.5
    s.FCN_DROPOUT = 0.1
    s.AUX_LOSS = False  # torchvision's auxiliary FCN head on AUX_IN_FEATURE
    s.AUX_IN_FEATURE = "res4"
    s.AUX_LOSS_WEIGHT = 0.5
    s.SIZE_DIVISIBILITY = -1  # pad the batch to a multiple; -1: the backbone's own
    cfg.MODEL.SEM_SEG_HEAD = s
    cfg.MODEL.RESNETS.RES4_DILATION = 1
    # "torchvision": a dilated stage's first block keeps the previous dilation
    # (replace_stride_with_dilation); "detectron2": every block of the stage is dilated
    cfg.MODEL.RESNETS.DILATION_MODE = "detectron2"
    # Training crops of the semantic mapper ("absolute": SIZE is (height, width) in pixels).
    cfg.INPUT.CROP = CfgNode({"ENABLED": False, "TYPE": "absolute", "SIZE": [512, 512]})

    # -- Panoptic FPN (META_ARCHITECTURE "PanopticFPN"; detectron2's panoptic configs set
    # SEM_SEG_HEAD.LOSS_WEIGHT 0.5). The RoI heads' losses are multiplied by
    # INSTANCE_LOSS_WEIGHT.
    p = CfgNode()
    p.INSTANCE_LOSS_WEIGHT = 1.0
    p.COMBINE = CfgNode()
    p.COMBINE.ENABLED = True  # merge instances and stuff into panoptic_seg at inference
    p.COMBINE.OVERLAP_THRESH = 0.5  # drop an instance of which more than this share is taken
    p.COMBINE.STUFF_AREA_LIMIT = 4096  # smallest stuff segment, in pixels
    p.COMBINE.INSTANCES_CONFIDENCE_THRESH = 0.5  # lowest instance score merged
    # Names of the semantic labels (0: "things", then the stuff classes), from the training
    # dataset's stuff_classes; they go into the model's metadata and its checkpoints.
    p.STUFF_CLASS_NAMES = []
    cfg.MODEL.PANOPTIC_FPN = p
    return cfg


def get_cfg() -> CfgNode:
    """A fresh copy of the full defaults tree: detection's keys and segmentation's."""
    return add_segmentation_config(detection_get_cfg())


def load_config(name: str | os.PathLike | None = None, opts: Iterable[str] = ()) -> CfgNode:
    """:func:`get_cfg`, then the YAML file ``name`` (a path, or a name inside ``configs/``),
    then ``KEY VALUE`` overrides."""
    return detection_load_config(name, opts, cfg=get_cfg())
