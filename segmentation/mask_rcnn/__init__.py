"""Mask R-CNN on ResNet-FPN: the mask head, mask targets, mask pasting, checkpoint conversion.

    from detection.config import load_config
    from segmentation.mask_rcnn import build_mask_rcnn
    model = build_mask_rcnn(load_config("mask_rcnn_r18_fpn_shapes.yaml")).eval()
    out = model([image_uint8_chw])[0]   # boxes, scores, labels, masks (N, 1, H, W) probabilities,
                                        # binary_masks (N, H, W) bool

Importing this package registers ``MODEL.MASK_ON`` / ``MODEL.ROI_MASK_HEAD.*`` with
``detection.config``, makes the shared runner and ``detection.modeling.predictor.load_model``
build a Mask R-CNN when ``MODEL.MASK_ON`` is set (or ``META_ARCHITECTURE: MaskRCNN``), and so
lets ``tools/train_det.py``, ``demo.py`` and ``submit_coco.py`` handle masks.
"""

from .build import (
    add_mask_config,
    build_mask_head,
    build_mask_rcnn,
    build_rcnn,
    load_mask_rcnn_weights,
    wants_masks,
)
from .convert import detectron2_to_ours, to_ours, torchvision_to_ours
from .mask_head import MaskRCNNHead
from .model import MaskPreprocessor, MaskRCNN
from .paste import PASTE_MODES, paste_masks
from .targets import crop_and_resize, mask_targets, resize_masks

__all__ = [
    "PASTE_MODES",
    "MaskPreprocessor",
    "MaskRCNN",
    "MaskRCNNHead",
    "add_mask_config",
    "build_mask_head",
    "build_mask_rcnn",
    "build_rcnn",
    "crop_and_resize",
    "detectron2_to_ours",
    "load_mask_rcnn_weights",
    "mask_targets",
    "paste_masks",
    "resize_masks",
    "to_ours",
    "torchvision_to_ours",
    "wants_masks",
]


def _register() -> None:
    from detection.config import register_config_extender
    from detection.engine.runner import register_meta_architecture
    from detection.modeling.predictor import register_model_builder

    register_config_extender(add_mask_config)
    # "GeneralizedRCNN" with MODEL.MASK_ON (detectron2's way) and "MaskRCNN" both build one;
    # the runner finds the weight loader by the model's class name.
    register_meta_architecture("GeneralizedRCNN", build_rcnn)
    register_meta_architecture("MaskRCNN", build_mask_rcnn, load_weights=load_mask_rcnn_weights)
    register_model_builder(wants_masks, build_mask_rcnn, to_ours)


_register()
