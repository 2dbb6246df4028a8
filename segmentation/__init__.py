"""Segmentation models on top of ``backbones`` and ``detection``.

- ``segmentation.config``: the config (detection's keys and segmentation's); load a
  segmentation config with ``segmentation.config.load_config``.
- ``segmentation.mask_rcnn``, ``segmentation.semantic`` and ``segmentation.panoptic``: the
  models; each declares its model
  family (builder, weights, mapper, evaluator) in its ``family.py``, which registers it in
  detection's family table (:mod:`detection.families`) when imported.
"""

from . import config, mask_rcnn, panoptic, semantic
from .predictor import load_model

__all__ = ["config", "load_model", "mask_rcnn", "panoptic", "semantic"]
