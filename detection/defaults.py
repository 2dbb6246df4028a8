"""Every default of ``detection``'s config, in one tree: ``detection.config.get_cfg()`` returns a
copy of it. Key names and values follow detectron2's (Base-RCNN, C4 layout); the YAML files
under ``configs/`` select FPN or torchvision's conventions.

Packages above detection declare their own keys in their own module and extend this tree
explicitly (``segmentation.config.get_cfg()``); detection never imports them.

Who owns what:

- **Normalization: the config alone.** ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` (0-255 scale) in
  the channel order ``MODEL.INPUT_FORMAT`` ("RGB" or "BGR", the order the weights expect;
  images always enter the model as RGB). The weights registry's metadata (pixel mean/std,
  channel order of ``backbones`` weights) is data the configs are written from; a test checks
  that every config naming registered backbone weights agrees with it. Nothing reads
  normalization from a backbone object.
- **Resizing in training: the data mapper.** It resizes each training image (and its boxes and
  masks, with the same transform) to ``INPUT.MIN_SIZE_TRAIN`` (one size per image, sampled by
  ``INPUT.MIN_SIZE_TRAIN_SAMPLING``) with the longest edge capped at ``INPUT.MAX_SIZE_TRAIN``,
  before augmentation, in the loader workers. **At test time the model resizes**
  (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), so a checkpoint and its config define the whole
  function from an image to detections in that image's pixels. ``INPUT.RESIZE_IN_MODEL_TRAIN``
  is kept for compatibility only (see :data:`KEYS_KEPT_FOR_COMPATIBILITY`).
"""

from __future__ import annotations

import math

from detection.config import CfgNode

__all__ = ["KEYS_DECLARED_ABOVE", "KEYS_KEPT_FOR_COMPATIBILITY", "RENAMED_KEYS",
           "detection_defaults"]

# Keys of the tree that no code path needs to read, each with why it stays. A test
# (tests/detection/test_config_keys.py) checks that every other key is read.
KEYS_KEPT_FOR_COMPATIBILITY: dict[str, str] = {
    "VERSION": "the config format's version, written into every saved config.yaml",
    "INPUT.RESIZE_IN_MODEL_TRAIN": (
        "False (the default): the mapper resizes training images. True moves training-time "
        "resizing into the model, as torchvision does; kept for the torchvision parity tests "
        "and for configs written before the mapper owned it"),
}

# Keys that this tree dropped or that other toolkits spell differently: loading one is an error
# that names the key to use instead.
RENAMED_KEYS: dict[str, str] = {
    "TEST.DETECTIONS_PER_IMAGE": "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE (R-CNN), "
                                 "MODEL.RETINANET.DETECTIONS_PER_IMAGE (RetinaNet) or "
                                 "MODEL.FCOS.DETECTIONS_PER_IMAGE (FCOS)",
    "INPUT.FORMAT": "MODEL.INPUT_FORMAT (images always enter as RGB; it is the weights' order)",
    "INPUT.MASK_FORMAT": "nothing: the mapper reads polygons, RLE and bitmasks as the json holds "
                         "them; remove the key",
}

# Keys that packages above detection declare in their own defaults (dotted prefixes): met by
# detection's tree alone, they are an error that says which package's config to load.
# segmentation's test checks this list against segmentation.config.
KEYS_DECLARED_ABOVE: dict[str, str] = {
    "MODEL.MASK_ON": "segmentation",
    "MODEL.ROI_MASK_HEAD": "segmentation",
    "MODEL.SEM_SEG_HEAD": "segmentation",
    "MODEL.RESNETS.RES4_DILATION": "segmentation",
    "MODEL.RESNETS.DILATION_MODE": "segmentation",
    "INPUT.CROP": "segmentation",
    "MODEL.PANOPTIC_FPN": "segmentation",
}


def detection_defaults() -> CfgNode:
    """A new tree with every detection key at its default."""
    _C = CfgNode()
    _C.VERSION = 2

    _C.MODEL = _model()

    _C.INPUT = CfgNode()
    # Training sizes, applied by the mapper (see the module docstring): the shortest edge is
    # one of MIN_SIZE_TRAIN ("choice") or uniform in [min, max] of it ("range").
    _C.INPUT.MIN_SIZE_TRAIN = (640, 672, 704, 736, 768, 800)
    _C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    _C.INPUT.MAX_SIZE_TRAIN = 1333
    # Test sizes, applied by the model.
    _C.INPUT.MIN_SIZE_TEST = 800
    _C.INPUT.MAX_SIZE_TEST = 1333
    # Resize rule (shortest edge to MIN_SIZE, longest capped): "detectron2" (also
    # "shortest_edge") rounds the size half up; "torchvision" interpolates with a scale factor.
    _C.INPUT.RESIZE_MODE = "detectron2"
    _C.INPUT.RESIZE_IN_MODEL_TRAIN = False  # compatibility only; see the module docstring
    _C.INPUT.HFLIP_PROB = 0.5
    _C.INPUT.PHOTOMETRIC = CfgNode()
    _C.INPUT.PHOTOMETRIC.ENABLED = False
    _C.INPUT.PHOTOMETRIC.PROB = 0.8
    _C.INPUT.PHOTOMETRIC.BRIGHTNESS = 0.2
    _C.INPUT.PHOTOMETRIC.CONTRAST = 0.2
    _C.INPUT.PHOTOMETRIC.SATURATION = 0.2
    _C.INPUT.PHOTOMETRIC.HUE = 0.02

    _C.DATASETS = CfgNode()
    _C.DATASETS.TRAIN = ("coco_2017_train",)
    _C.DATASETS.TEST = ("coco_2017_val",)
    # Root of the built-in datasets; "" means env var DETKIT_DATASETS, else ./datasets.
    _C.DATASETS.ROOT = ""

    _C.DATALOADER = CfgNode()
    _C.DATALOADER.NUM_WORKERS = 4
    _C.DATALOADER.ASPECT_RATIO_GROUPING = True
    _C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    # Skip (and count) records whose image file is missing or unreadable instead of raising;
    # evaluation then covers the images it could read and says how many it could not.
    _C.DATALOADER.SKIP_MISSING_IMAGES = False
    # Check every record before training / evaluation: "fast" (file exists, header readable,
    # size equals the json's after EXIF), "full" (also decode every image and validate every
    # segmentation) or "off".
    _C.DATALOADER.CHECK_DATA = "fast"
    # Reuse the check's report saved by an earlier start ($DETKIT_CACHE/data_checks) while the
    # json, the image folders and the files it found unusable are unchanged; False checks
    # every image again and replaces the saved report.
    _C.DATALOADER.CHECK_DATA_CACHE = True

    _C.SOLVER = _solver()

    _C.TEST = CfgNode()
    _C.TEST.EVAL_PERIOD = 0  # 0 disables periodic evaluation
    # COCO AP engine: "auto" (faster-coco-eval when installed), "pycocotools", "faster_coco_eval"
    _C.TEST.EVAL_ENGINE = "auto"
    # Inference runtime of the tools: "torch", "onnxruntime" or "openvino"; and its precision,
    # "fp32" or "bf16" (convolutions in bf16; boxes, scores and NMS in float32).
    _C.TEST.RUNTIME = "torch"
    _C.TEST.PRECISION = "fp32"
    # The inference tools (demo, --eval-only, submission) on a CPU set glibc's malloc to keep
    # freed memory for reuse (backbones.cpu_memory): large feature maps are not page-faulted
    # in again on every call. The process keeps its peak memory until it exits.
    _C.TEST.RETAIN_FREED_MEMORY = True
    # Test-time augmentation of the detectors (detection/modeling/tta.py), for --eval-only and
    # load_model: the model runs at each shortest edge of MIN_SIZES (longest edge capped at
    # MAX_SIZE), and on the horizontally flipped image too with FLIP; the detections are merged.
    _C.TEST.AUG = CfgNode()
    _C.TEST.AUG.ENABLED = False
    _C.TEST.AUG.MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
    _C.TEST.AUG.MAX_SIZE = 4000
    _C.TEST.AUG.FLIP = True

    # Modules imported after the config is read (names or .py paths), so that YAML can name the
    # backbones, families and datasets they register (detection/custom_imports.py)
    _C.CUSTOM_IMPORTS = []
    _C.OUTPUT_DIR = "./output"
    # Seeds the sampler's shuffles and per-sample augmentation; a negative value means
    # "draw one at start", which the trainer should then record in the saved config.
    _C.SEED = 0
    return _C


def _solver() -> CfgNode:
    s = CfgNode()
    s.OPTIMIZER = "SGD"  # "SGD" or "AdamW"
    # torch's fused optimizer kernels (build_optimizer); off: torch's default implementation,
    # which the embedded defaults' published figures were measured with (RetinaNet's: fused)
    s.FUSED_OPTIMIZER = False
    s.IMS_PER_BATCH = 16
    s.BASE_LR = 0.02
    s.BASE_LR_END = 0.0  # the final lr of WarmupCosineLR
    s.MOMENTUM = 0.9  # SGD
    s.NESTEROV = False  # SGD
    s.BETAS = (0.9, 0.999)  # AdamW
    s.WEIGHT_DECAY = 1e-4
    s.WEIGHT_DECAY_NORM = 0.0
    s.LR_SCHEDULER_NAME = "WarmupMultiStepLR"  # or "WarmupCosineLR"
    s.MAX_ITER = 90000
    s.STEPS = (60000, 80000)
    s.GAMMA = 0.1
    s.WARMUP_ITERS = 1000
    s.WARMUP_FACTOR = 0.001
    s.WARMUP_METHOD = "linear"
    s.CHECKPOINT_PERIOD = 5000
    # Periodic checkpoints kept in OUTPUT_DIR, the newest ones (detectron2's PeriodicCheckpointer
    # max_to_keep); 0 keeps them all. model_final.pth is never removed.
    s.MAX_TO_KEEP = 0
    s.LOG_PERIOD = 20  # iterations between console / metrics.json lines
    s.CLIP_GRADIENTS = CfgNode()
    s.CLIP_GRADIENTS.ENABLED = False
    s.CLIP_GRADIENTS.CLIP_TYPE = "norm"  # "norm" or "value"
    s.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    s.CLIP_GRADIENTS.NORM_TYPE = 2.0
    s.AMP = CfgNode()
    # Mixed precision: float16 autocast with a GradScaler on CUDA (detectron2's), bf16
    # autocast on a CPU with native bf16 (avx512_bf16 / AMX); ignored, with a warning, elsewhere
    s.AMP.ENABLED = False
    # KEY VALUE pairs that replace the config's values when AMP is enabled but cannot run on
    # this machine (a CPU without native bf16), e.g. a shorter float32 schedule; logged
    s.AMP.FALLBACK_OPTS = []
    return s


def _model() -> CfgNode:
    _M = CfgNode()
    # The model family (detection.families): "GeneralizedRCNN" is Faster R-CNN (Mask R-CNN
    # with segmentation's MODEL.MASK_ON, as in detectron2).
    _M.META_ARCHITECTURE = "GeneralizedRCNN"
    _M.WEIGHTS = ""  # a whole-detector checkpoint: zoo name, URL or path
    _M.DEVICE = "cpu"
    # Normalization (the only place it is declared): 0-255 scale, in the channel order of
    # INPUT_FORMAT, the order the weights expect. These are the MSRA weights'.
    _M.PIXEL_MEAN = [103.530, 116.280, 123.675]
    _M.PIXEL_STD = [1.0, 1.0, 1.0]
    _M.INPUT_FORMAT = "BGR"
    # Labels and names of the classes; empty: COCO when NUM_CLASSES is 80 (or torchvision's
    # 90), class_0.. otherwise. Training fills them from the dataset; checkpoints carry them.
    _M.CLASS_NAMES = []
    _M.CATEGORY_IDS = []

    _M.BACKBONE = CfgNode()
    # A registered backbone (backbones.list_backbones(): "resnet50", "resnet50d",
    # "resnext101_32x8d", your own) or the older "resnet" / "resnet_fpn", which take
    # MODEL.RESNETS.DEPTH, NUM_GROUPS and WIDTH_PER_GROUP and imply the neck.
    _M.BACKBONE.NAME = "resnet"
    _M.BACKBONE.NECK = ""  # "fpn" or "none"; empty: what a "resnet*" name implies, else none
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
    # Per level (or one list split over the levels), sqrt of the anchor areas; floats, as
    # detectron2's RetinaNet uses 32 * 2**(k/3).
    _M.ANCHOR_GENERATOR.SIZES = [[32.0, 64.0, 128.0, 256.0, 512.0]]
    _M.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    _M.ANCHOR_GENERATOR.OFFSET = 0.0
    _M.ANCHOR_GENERATOR.ROUND_BASE = False  # torchvision rounds the cell anchors
    _M.ANCHOR_GENERATOR.RATIO_MAJOR = False  # torchvision orders cell anchors by ratio
    _M.ANCHOR_GENERATOR.INFER_STRIDES = False  # torchvision: padded size // feature size

    _M.RPN = CfgNode()
    _M.RPN.HEAD_NAME = "StandardRPNHead"  # detection.modeling.registry.RPN_HEADS
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
    _M.ROI_HEADS.NAME = "Res5ROIHeads"  # "StandardROIHeads" (FPN), "CascadeROIHeads"; registry
    _M.ROI_HEADS.NUM_CLASSES = 80
    _M.ROI_HEADS.IN_FEATURES = ["res4"]
    _M.ROI_HEADS.IOU_THRESHOLDS = [0.5]
    _M.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    _M.ROI_HEADS.POSITIVE_FRACTION = 0.25
    _M.ROI_HEADS.PROPOSAL_APPEND_GT = True
    _M.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    _M.ROI_HEADS.NMS_THRESH_TEST = 0.5
    _M.ROI_HEADS.DETECTIONS_PER_IMAGE = 100  # detectron2: TEST.DETECTIONS_PER_IMAGE
    _M.ROI_HEADS.MIN_BOX_SIZE = 0.0  # torchvision drops detections under 1e-2 pixels

    _M.RETINANET = _retinanet()
    _M.FCOS = _fcos()

    _M.ROI_BOX_HEAD = CfgNode()
    _M.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"  # registry.ROI_BOX_HEADS; FPN's box head
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

    # Cascade R-CNN (ROI_HEADS.NAME "CascadeROIHeads"): per stage, the IoU at which its RoIs
    # are foreground (the first must equal ROI_HEADS.IOU_THRESHOLDS) and its box coding weights
    _M.ROI_BOX_CASCADE_HEAD = CfgNode()
    _M.ROI_BOX_CASCADE_HEAD.IOUS = (0.5, 0.6, 0.7)
    _M.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS = (
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))

    # Keypoint R-CNN: GeneralizedRCNN with KEYPOINT_ON (detectron2's names)
    _M.KEYPOINT_ON = False
    _M.ROI_KEYPOINT_HEAD = CfgNode()
    _M.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = 17
    _M.ROI_KEYPOINT_HEAD.CONV_DIMS = (512,) * 8
    _M.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION = 14
    _M.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO = 0
    _M.ROI_KEYPOINT_HEAD.POOLER_TYPE = "ROIAlignV2"  # "ROIAlign": torchvision's
    _M.ROI_KEYPOINT_HEAD.LOSS_WEIGHT = 1.0
    # True: the summed loss over the number of visible keypoints (torchvision's too); False:
    # over ROI_HEADS.BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION * NUM_KEYPOINTS per image
    _M.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS = True
    # training images (of DATASETS.TRAIN) with fewer visible keypoints are skipped
    _M.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE = 1
    # Pixels added to the x, y of the target keypoints (in the model's input pixels) and
    # subtracted from the predicted ones, so that both are in COCO's convention (pixel
    # indices) while the model works in its weights' own: 0.0 for torchvision's (raw COCO
    # coordinates), 0.5 for detectron2's (index + 0.5, continuous coordinates)
    _M.ROI_KEYPOINT_HEAD.COORDINATE_OFFSET = 0.0
    return _M


def _retinanet() -> CfgNode:
    """RetinaNet (``MODEL.META_ARCHITECTURE: RetinaNet``); detectron2's names and defaults,
    plus the choices in which torchvision differs (see ``configs/torchvision/retinanet_*``)."""
    r = CfgNode()
    r.NUM_CLASSES = 80  # foreground classes
    r.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    r.NUM_CONVS = 4  # 3x3 convs of each subnet (classification, box), shared by the levels
    r.NORM = ""  # "" or "GN" after each subnet conv (torchvision v2: GN, 32 groups)
    # P6 (and P7 from relu(P6)) by a stride-2 3x3 conv of "c5" (the last bottom-up map:
    # detectron2, torchvision v2) or "p5" (torchvision v1).
    r.TOP_BLOCK_IN = "c5"
    # IoU below the first threshold: background (label 0); from the second: foreground (1);
    # in between: ignored (-1). Each ground truth's best anchors are foreground too.
    r.IOU_THRESHOLDS = [0.4, 0.5]
    r.IOU_LABELS = [0, -1, 1]
    # "iou": RetinaNet's matching at IOU_THRESHOLDS; "atss": adaptive training sample
    # selection (mmdetection's ATSS assigner), ATSS_TOPK nearest anchors per level
    r.MATCHER = "iou"
    r.ATSS_TOPK = 9
    r.PRIOR_PROB = 0.01  # initial foreground probability: the bias of the class logits
    r.SCORE_THRESH_TEST = 0.05
    r.TOPK_CANDIDATES_TEST = 1000  # per level, before NMS
    r.NMS_THRESH_TEST = 0.5  # per class
    r.DETECTIONS_PER_IMAGE = 100  # detectron2: TEST.DETECTIONS_PER_IMAGE; torchvision: 300
    r.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    r.FOCAL_LOSS_GAMMA = 2.0
    r.FOCAL_LOSS_ALPHA = 0.25
    r.SMOOTH_L1_LOSS_BETA = 0.1  # 0: L1 (detectron2's configs, torchvision v1)
    r.BBOX_REG_LOSS_TYPE = "smooth_l1"  # or "giou" (torchvision v2)
    r.BBOX_REG_LOSS_WEIGHT = 1.0  # both peers' RetinaNets: 1; mmdetection's ATSS/GFL GIoU: 2
    # "ema": the batch's sums over a running mean of its foreground anchors (detectron2);
    # "per_image": each image's sum over its own foreground count, averaged (torchvision).
    r.LOSS_NORMALIZER = "ema"
    return r


def _fcos() -> CfgNode:
    """FCOS (``MODEL.META_ARCHITECTURE: FCOS``): detectron2's names where its FCOS has them,
    and both peers' defaults (``configs/torchvision/fcos_resnet50_fpn.yaml``). Its points are
    squares of the level strides: MODEL.ANCHOR_GENERATOR gives only OFFSET and INFER_STRIDES."""
    f = CfgNode()
    f.NUM_CLASSES = 80  # foreground classes
    f.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    f.NUM_CONVS = 4  # 3x3 convs of each tower (classification, box), shared by the levels
    f.HEAD_NORM = "GN"  # after each tower conv (GroupNorm, 32 groups); "" for none
    f.TOP_BLOCK_IN = "p5"  # P6 (and P7 from relu(P6)) from "p5" (both peers) or "c5"
    f.PRIOR_PROB = 0.01  # initial foreground probability: the bias of the class logits
    # A point is foreground for a box only if the box's centre is within this many of its
    # level's strides (torchvision's center_sampling_radius)
    f.CENTER_SAMPLING_RADIUS = 1.5
    f.FOCAL_LOSS_ALPHA = 0.25
    f.FOCAL_LOSS_GAMMA = 2.0
    f.BOX_REG_LOSS = "giou"  # on the decoded boxes; or "diou", "ciou"
    # Per level, the top TOPK_CANDIDATES_TEST sqrt(class x centerness) scores above
    # SCORE_THRESH_TEST; then a per-class NMS
    f.SCORE_THRESH_TEST = 0.2
    f.TOPK_CANDIDATES_TEST = 1000
    f.NMS_THRESH_TEST = 0.6
    f.DETECTIONS_PER_IMAGE = 100
    return f
