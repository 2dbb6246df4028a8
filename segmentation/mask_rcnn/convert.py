"""Converting torchvision's and detectron2's Mask R-CNN checkpoints to our parameter names: the
detector's keys go through ``detection.modeling.convert``, the mask head's are mapped here.

Ours: ``roi_heads.mask_head.convs.{i}.conv`` / ``.norm`` (i = 0..3), ``roi_heads.mask_head.
deconv`` and ``roi_heads.mask_head.predictor`` (one channel per foreground class).

torchvision: ``roi_heads.mask_head.{i}.0`` (conv) and ``.{i}.1`` (v2's BatchNorm), or the
published v1 file's ``roi_heads.mask_head.mask_fcn{i+1}``; ``roi_heads.mask_predictor.
conv5_mask`` (deconv) and ``roi_heads.mask_predictor.mask_fcn_logits`` (91 channels with the
background first: it is dropped, so that our label k is torchvision's k + 1, as for boxes).

detectron2: ``roi_heads.mask_head.mask_fcn{i+1}`` (with ``.norm`` when normalized),
``roi_heads.mask_head.deconv`` and ``roi_heads.mask_head.predictor`` (no background).
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from detection.modeling import convert as det_convert

StateDict = Dict[str, Tensor]
_MASK_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")


def _tensor(v: Any) -> Tensor:
    """A tensor from a tensor or a (pickled detectron2) numpy array."""
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return torch.as_tensor(v)


def _split(state_dict: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(mask-head entries, the rest)."""
    mask = {k: v for k, v in state_dict.items() if k.startswith(_MASK_PREFIXES)}
    return mask, {k: v for k, v in state_dict.items() if k not in mask}


def _torchvision_mask_key(key: str) -> Optional[str]:
    m = re.match(r"roi_heads\.mask_head\.(\d+)\.(0|1)\.(.+)$", key)
    if m:
        part = "conv" if m.group(2) == "0" else "norm"
        return f"roi_heads.mask_head.convs.{m.group(1)}.{part}.{m.group(3)}"
    m = re.match(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", key)
    if m:
        return f"roi_heads.mask_head.convs.{int(m.group(1)) - 1}.conv.{m.group(2)}"
    m = re.match(r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)$", key)
    if m:
        name = "deconv" if m.group(1) == "conv5_mask" else "predictor"
        return f"roi_heads.mask_head.{name}.{m.group(2)}"
    return None


def _detectron2_mask_key(key: str) -> Optional[str]:
    m = re.match(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(?:(norm)\.)?(.+)$", key)
    if m:
        part = "norm" if m.group(2) else "conv"
        return f"roi_heads.mask_head.convs.{int(m.group(1)) - 1}.{part}.{m.group(3)}"
    m = re.match(r"roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)$", key)
    if m:
        return key
    return None


def torchvision_to_ours(state_dict: Mapping[str, Any]) -> StateDict:
    """torchvision ``MaskRCNN`` (v1 or v2; published-file or today's names) -> ours."""
    mask, rest = _split(state_dict)
    out = det_convert.torchvision_to_ours(rest)
    for key, value in mask.items():
        new = _torchvision_mask_key(key)
        if new is None:
            raise KeyError(f"unexpected key in a torchvision Mask R-CNN checkpoint: {key!r}")
        value = _tensor(value)
        if new.startswith("roi_heads.mask_head.predictor."):
            value = value[1:]  # drop the background channel
        out[new] = value
    return out


def detectron2_to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """detectron2 ``GeneralizedRCNN`` with a mask head (``{"model": sd}`` or sd) -> ours."""
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise TypeError("a detectron2 checkpoint is {'model': state_dict}")
    mask, rest = _split(state_dict)
    out = det_convert.detectron2_to_ours(rest)
    for key, value in mask.items():
        new = _detectron2_mask_key(key)
        if new is None:
            raise KeyError(f"unexpected key in a detectron2 Mask R-CNN checkpoint: {key!r}")
        out[new] = _tensor(value)
    return out


def to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """Any supported Mask R-CNN (or Faster R-CNN) checkpoint -> our state dict."""
    fmt = det_convert.detect_format(checkpoint)
    if fmt == "detectron2":
        return detectron2_to_ours(checkpoint)
    sd = checkpoint.get("model", checkpoint)
    if fmt == "torchvision":
        return torchvision_to_ours(sd)
    return {k: _tensor(v) for k, v in sd.items()}
