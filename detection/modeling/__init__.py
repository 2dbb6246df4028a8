"""Faster R-CNN (ResNet-FPN and ResNet-C4) that owns its preprocessing and loads torchvision's
and detectron2's checkpoints.

    from detection.modeling import load_model, predict
    model = load_model("detectron2/faster_rcnn_R_50_FPN_3x")
    predict(model, "image.jpg")   # {"boxes", "scores", "labels", "class_names", ...}

Building from a config: ``build_model(cfg)``, with ``cfg.MODEL`` defaults from
``add_model_config``. Training: ``model(images, targets) -> dict of losses``.
"""

from .build import build_model
from .convert import detectron2_to_ours, load_state_dict, to_ours, torchvision_to_ours
from .defaults import add_model_config
from .faster_rcnn import FasterRCNN, GeneralizedRCNN
from .metadata import Metadata
from .predictor import load_model, predict
from .roi_heads import MaskHead
from .structures import Detections, SampledProposals
from .zoo import get_detector_weights, list_detector_weights

__all__ = [
    "Detections", "FasterRCNN", "GeneralizedRCNN", "MaskHead", "Metadata", "SampledProposals",
    "add_model_config", "build_model", "detectron2_to_ours", "get_detector_weights",
    "list_detector_weights", "load_model", "load_state_dict", "predict", "to_ours",
    "torchvision_to_ours",
]
