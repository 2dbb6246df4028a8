"""``load_model`` for segmentation configs and checkpoints: detection's
:func:`~detection.modeling.predictor.load_model` with segmentation's config.

    from segmentation import load_model
    model = load_model("torchvision/maskrcnn_resnet50_fpn.coco_v1")     # a zoo name
    model = load_model("configs/semantic_fpn_r18_shapes.yaml", "out/model_final.pth")
"""

from __future__ import annotations

import os
from typing import Optional

from torch import nn

from detection.config import CfgNode
from detection.modeling.predictor import load_model as detection_load_model
from detection.modeling.zoo import get_detector_weights, list_detector_weights

from .config import load_config

__all__ = ["load_model"]


def load_model(config: str | os.PathLike | CfgNode, weights: Optional[str] = None, *,
               device: str = "cpu", optimize: bool = True, runtime: str = "torch",
               precision: str = "auto") -> nn.Module:
    """Build the model of ``config`` (a YAML path or name, a CfgNode or a zoo name), read with
    segmentation's config, and load ``weights`` (default ``MODEL.WEIGHTS``) into it; in eval
    mode, frozen BatchNorm folded when ``optimize``. ``runtime`` and ``precision`` as in
    detection's ``load_model`` (Mask R-CNN exports; an export directory loads as it is)."""
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(
            os.path.join(config, "export.json")):
        return detection_load_model(config, runtime=runtime, precision=precision)
    if isinstance(config, str) and config in list_detector_weights():
        weights = weights or config
        config = get_detector_weights(config).config_path
    if not isinstance(config, CfgNode):
        config = load_config(config)
    return detection_load_model(config, weights, device=device, optimize=optimize,
                                runtime=runtime, precision=precision)
