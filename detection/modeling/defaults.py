"""Every ``cfg.MODEL`` default of the detectors, plus the model-side resize keys of
``cfg.INPUT``. Key names follow detectron2's where it has them; the values are detectron2's
Base-RCNN defaults (C4 layout), and the YAML files under ``configs/`` select FPN or torchvision's
conventions."""

import math

from fvcore.common.config import CfgNode


def add_model_config(cfg: CfgNode) -> CfgNode:
    """Set ``cfg.MODEL`` (replacing it) and the ``INPUT`` resize keys; returns ``cfg``."""
    _M = CfgNode()
    _M.META_ARCHITECTURE = "GeneralizedRCNN"
    _M.WEIGHTS = ""  # a whole-detector checkpoint: zoo name, URL or path
    _M.DEVICE = "cpu"
    # Normalization on a 0-255 scale, in the channel order of INPUT_FORMAT (the weights').
    _M.PIXEL_MEAN = [103.530, 116.280, 123.675]
    _M.PIXEL_STD = [1.0, 1.0, 1.0]
    _M.INPUT_FORMAT = "BGR"
    # Labels and names of the classes; empty: COCO when NUM_CLASSES is 80 (or torchvision's
    # 90), class_0.. otherwise. Checkpoints carry their own metadata.
    _M.CLASS_NAMES = []
    _M.CATEGORY_IDS = []

    _M.BACKBONE = CfgNode()
    _M.BACKBONE.NAME = "resnet"  # "resnet" (C4) or "resnet_fpn"
    _M.BACKBONE.FREEZE_AT = 2
    _M.BACKBONE.WEIGHTS = ""  # ImageNet weights by registered name, e.g. "detectron2/R-50"

    _M.RESNETS = CfgNode()
    _M.RESNETS.DEPTH = 50
    _M.RESNETS.OUT_FEATURES = ["res4"]
    _M.RESNETS.NUM_GROUPS = 1
    _M.RESNETS.WIDTH_PER_GROUP = 64
    _M.RESNETS.NORM = "FrozenBN"
    _M.RESNETS.STRIDE_IN_1X1 = True  # MSRA/caffe weights; False for torchvision's
    _M.RESNETS.RES5_DILATION = 1

    _M.FPN = CfgNode()
    _M.FPN.IN_FEATURES = []
    _M.FPN.OUT_CHANNELS = 256
    _M.FPN.NORM = ""

    _M.ANCHOR_GENERATOR = CfgNode()
    _M.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
    _M.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    _M.ANCHOR_GENERATOR.OFFSET = 0.0
    _M.ANCHOR_GENERATOR.ROUND_BASE = False  # torchvision rounds the cell anchors
    _M.ANCHOR_GENERATOR.RATIO_MAJOR = False  # torchvision orders cell anchors by ratio
    _M.ANCHOR_GENERATOR.INFER_STRIDES = False  # torchvision: padded size // feature size

    _M.RPN = CfgNode()
    _M.RPN.IN_FEATURES = ["res4"]
    _M.RPN.CONV_DIMS = [-1]  # one 3x3 conv per entry; -1: the input channels
    _M.RPN.IOU_THRESHOLDS = [0.3, 0.7]
    _M.RPN.BATCH_SIZE_PER_IMAGE = 256
    _M.RPN.POSITIVE_FRACTION = 0.5
    _M.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    _M.RPN.BBOX_SCALE_CLAMP = math.log(1000.0 / 16)
    _M.RPN.SMOOTH_L1_BETA = 0.0
    _M.RPN.LOSS_WEIGHT = 1.0
    _M.RPN.LOSS_NORMALIZER = "batch"  # "batch" (detectron2) or "sampled" (torchvision)
    _M.RPN.PRE_NMS_TOPK_TRAIN = 12000  # per level and image
    _M.RPN.PRE_NMS_TOPK_TEST = 6000
    _M.RPN.POST_NMS_TOPK_TRAIN = 2000  # per image
    _M.RPN.POST_NMS_TOPK_TEST = 1000
    _M.RPN.NMS_THRESH = 0.7
    _M.RPN.MIN_SIZE = 0.0  # proposals need width and height above it

    _M.ROI_HEADS = CfgNode()
    _M.ROI_HEADS.NAME = "Res5ROIHeads"  # or "StandardROIHeads" (FPN)
    _M.ROI_HEADS.NUM_CLASSES = 80
    _M.ROI_HEADS.IN_FEATURES = ["res4"]
    _M.ROI_HEADS.IOU_THRESHOLDS = [0.5]
    _M.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    _M.ROI_HEADS.POSITIVE_FRACTION = 0.25
    _M.ROI_HEADS.PROPOSAL_APPEND_GT = True
    _M.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    _M.ROI_HEADS.NMS_THRESH_TEST = 0.5
    _M.ROI_HEADS.DETECTIONS_PER_IMAGE = 100
    _M.ROI_HEADS.MIN_BOX_SIZE = 0.0  # torchvision drops detections under 1e-2 pixels

    _M.ROI_BOX_HEAD = CfgNode()
    _M.ROI_BOX_HEAD.NUM_CONV = 0
    _M.ROI_BOX_HEAD.CONV_DIM = 256
    _M.ROI_BOX_HEAD.NUM_FC = 0
    _M.ROI_BOX_HEAD.FC_DIM = 1024
    _M.ROI_BOX_HEAD.NORM = ""
    _M.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    _M.ROI_BOX_HEAD.BBOX_SCALE_CLAMP = math.log(1000.0 / 16)
    _M.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0
    _M.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
    _M.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
    _M.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"  # aligned; "ROIAlign": torchvision's
    # Box-to-level rule: "detectron2" floor(4 + log2(s/224 + 1e-8)), "torchvision"
    # floor(4 + log2(s/224) + 1e-6).
    _M.ROI_BOX_HEAD.POOLER_LEVEL_MAPPING = "detectron2"
    cfg.MODEL = _M

    if "INPUT" not in cfg:
        cfg.INPUT = CfgNode()
    cfg.INPUT.MIN_SIZE_TRAIN = (640, 672, 704, 736, 768, 800)
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333
    # Resize rule (shortest edge to MIN_SIZE, longest capped): "detectron2" (also
    # "shortest_edge") rounds the size half up; "torchvision" interpolates with a scale factor.
    cfg.INPUT.RESIZE_MODE = "detectron2"
    # Whether the model resizes training images itself (off when the data loader did).
    cfg.INPUT.RESIZE_IN_MODEL_TRAIN = True
    return cfg
