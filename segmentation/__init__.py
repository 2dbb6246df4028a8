"""Segmentation models on top of ``backbones`` and ``detection``; importing a subpackage
registers its config keys and meta-architectures with the shared tools."""

from . import (
    mask_rcnn,  # noqa: F401  (registers MaskRCNN and MODEL.MASK_ON / ROI_MASK_HEAD.*)
    semantic,  # noqa: F401  (registers SemanticSegmentor and MODEL.SEM_SEG_HEAD.*)
)
