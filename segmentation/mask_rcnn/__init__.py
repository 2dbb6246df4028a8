"""Mask R-CNN on ResNet-FPN: the mask head, mask targets, mask pasting, checkpoint conversion.

    from segmentation.config import load_config
    from segmentation.mask_rcnn import build_mask_rcnn
    model = build_mask_rcnn(load_config("mask_rcnn_r18_fpn_shapes.yaml")).eval()
    out = model([image_uint8_chw])[0]   # boxes, scores, labels, masks (N, 1, H, W) probabilities,
                                        # binary_masks (N, H, W) bool

Its config keys (``MODEL.MASK_ON``, ``MODEL.ROI_MASK_HEAD.*``) are declared in
``segmentation.config``. Its model family (``family.py``: builder, weights, mapper, evaluator)
is registered in detection's family table on import, so ``META_ARCHITECTURE: MaskRCNN`` (or
``GeneralizedRCNN`` with ``MODEL.MASK_ON``) trains, evaluates and loads through the shared
engine and ``load_model``.
"""

from .build import build_mask_head, build_mask_rcnn
from .convert import detectron2_to_ours, to_ours, torchvision_to_ours
from .family import MASK_RCNN
from .mask_head import MaskRCNNHead
from .model import MaskPreprocessor, MaskRCNN
from .paste import PASTE_MODES, paste_masks
from .targets import crop_and_resize, mask_targets, resize_masks

__all__ = [
    "MASK_RCNN",
    "PASTE_MODES",
    "MaskPreprocessor",
    "MaskRCNN",
    "MaskRCNNHead",
    "build_mask_head",
    "build_mask_rcnn",
    "crop_and_resize",
    "detectron2_to_ours",
    "mask_targets",
    "paste_masks",
    "resize_masks",
    "to_ours",
    "torchvision_to_ours",
]

