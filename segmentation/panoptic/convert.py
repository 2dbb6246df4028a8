"""detectron2's Panoptic FPN checkpoints (``panoptic_fpn_R_50_1x/3x``, ``R_101_3x``) -> our
parameter names: the Mask R-CNN keys through ``segmentation.mask_rcnn.convert``, the semantic
branch's here.

detectron2's ``SemSegFPNHead`` registers each level's ``nn.Sequential`` under the level's name,
with an ``nn.Upsample`` after every conv of a level coarser than the common stride::

    sem_seg_head.p2.0                  -> sem_seg_head.scale_heads.p2.0.conv
    sem_seg_head.p{3,4,5}.{2i}         -> sem_seg_head.scale_heads.p{3,4,5}.{i}.conv
    sem_seg_head.p*.{j}.norm           -> sem_seg_head.scale_heads.p*.{j // 2}.norm
    sem_seg_head.predictor             -> sem_seg_head.predictor
"""

import re
from typing import Any, Dict, Mapping

import numpy as np
import torch
from torch import Tensor

from detection.modeling import convert as det_convert
from segmentation.mask_rcnn import convert as mask_convert

__all__ = ["detectron2_to_ours", "to_ours"]

StateDict = Dict[str, Tensor]


def _sem_seg_key(key: str) -> str:
    m = re.match(r"sem_seg_head\.(p\d)\.(\d+)\.(?:(norm)\.)?(weight|bias)$", key)
    if m:
        j = int(m.group(2))
        if j % 2:
            raise KeyError(f"{key!r}: odd indices of a detectron2 scale head are upsamplings, "
                           "which have no parameters")
        part = "norm" if m.group(3) else "conv"
        return f"sem_seg_head.scale_heads.{m.group(1)}.{j // 2}.{part}.{m.group(4)}"
    if re.match(r"sem_seg_head\.predictor\.(weight|bias)$", key):
        return key
    raise KeyError(f"unexpected key in a detectron2 Panoptic FPN checkpoint: {key!r}")


def detectron2_to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """detectron2 ``PanopticFPN`` (``{"model": sd}`` or sd) -> ours."""
    sd = checkpoint.get("model", checkpoint)
    sem = {k: v for k, v in sd.items() if k.startswith("sem_seg_head.")}
    out = mask_convert.detectron2_to_ours({k: v for k, v in sd.items() if k not in sem})
    for key, value in sem.items():
        if isinstance(value, np.ndarray):  # detectron2's pickled arrays
            value = torch.from_numpy(np.ascontiguousarray(value))
        out[_sem_seg_key(key)] = torch.as_tensor(value)
    return out


def to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """Our Panoptic FPN checkpoint or detectron2's -> our state dict."""
    if det_convert.detect_format(checkpoint) == "detectron2":
        return detectron2_to_ours(checkpoint)
    return mask_convert.to_ours(checkpoint)
