"""Converting torchvision's and detectron2's FCOS checkpoints to our parameter names.

Ours (:mod:`detection.modeling.fcos`): the FPN backbone as RetinaNet's (``backbone.bottom_up.*``,
``backbone.lateral_convs.{i}`` / ``output_convs.{i}``, ``backbone.top_block.p6`` / ``.p7``),
``head.cls_convs.{i}`` / ``head.box_convs.{i}`` (``.conv``, ``.norm``), ``head.cls_score`` (K
channels), ``head.bbox_pred`` and ``head.ctrness``.

torchvision (``fcos_resnet50_fpn``): ``backbone.body.*``, ``backbone.fpn.inner_blocks.{i}.0`` /
``layer_blocks.{i}.0``, ``backbone.fpn.extra_blocks.p6`` / ``.p7``,
``head.classification_head.conv.{j}`` (Sequential of conv, GroupNorm, ReLU),
``head.classification_head.cls_logits`` with 91 channels whose class 0 (background, never a
target) is dropped, so that our label k is torchvision's k + 1, ``head.regression_head.conv.{j}``,
``.bbox_reg`` and ``.bbox_ctrness``.

detectron2 (``meta_arch/fcos.py``, a ``RetinaNetHead`` with one anchor plus ``ctrness``):
``backbone.bottom_up.*``, ``backbone.fpn_lateral{3-5}`` / ``fpn_output{3-5}``,
``backbone.top_block.p6`` / ``.p7``, ``head.cls_subnet.{j}`` / ``head.bbox_subnet.{j}``
(conv, [norm,] ReLU), ``head.cls_score`` (K classes), ``head.bbox_pred`` and ``head.ctrness``.
"""

import re
from typing import Any, Dict, List, Mapping, Tuple

from torch import Tensor

from .checkpoint_format import detect_format as detect_checkpoint_format
from .checkpoint_format import register_family_marks, register_format_marks, state_dict_of
from .convert import (
    FPNEntry,
    _as_tensor,
    detectron2_backbone_entry,
    detectron2_fpn_entries,
    torchvision_backbone_entry,
)
from .retinanet_convert import _detectron2_subnet

StateDict = Dict[str, Tensor]
_TOWERS = {"classification_head": "cls_convs", "regression_head": "box_convs",
           "cls_subnet": "cls_convs", "bbox_subnet": "box_convs"}
_TORCHVISION_OUTPUTS = {"classification_head.cls_logits": "cls_score",
                        "regression_head.bbox_reg": "bbox_pred",
                        "regression_head.bbox_ctrness": "ctrness"}


def _towers_to_ours(towers: Dict[str, List[Tuple[int, str, Tensor]]], out: StateDict) -> None:
    """Each tower's ``(index in its Sequential, 'weight'/'bias'/..., tensor)`` entries: convs
    in order, a norm belonging to the conv before it."""
    for dst, entries in towers.items():
        _detectron2_subnet(entries, dst, out)


def torchvision_to_ours(state_dict: Mapping[str, Any]) -> StateDict:
    """torchvision ``FCOS`` -> ours; an unknown key is a KeyError naming it."""
    out: StateDict = {}
    towers: Dict[str, List[Tuple[int, str, Tensor]]] = {"cls_convs": [], "box_convs": []}
    for key, value in state_dict.items():
        value = _as_tensor(value)
        mapped = torchvision_backbone_entry(key, value)
        if mapped is not None:
            out.update(mapped)
            continue
        m = re.match(r"head\.(classification_head|regression_head)\.conv\.(\d+)\.(.+)$", key)
        if m:
            towers[_TOWERS[m.group(1)]].append((int(m.group(2)), m.group(3), value))
            continue
        m = re.match(r"head\.(\w+\.\w+)\.(weight|bias)$", key)
        if m and m.group(1) in _TORCHVISION_OUTPUTS:
            name = _TORCHVISION_OUTPUTS[m.group(1)]
            if name == "cls_score":  # (1 + K, ...) -> drop the background logit
                if value.shape[0] < 2:
                    raise ValueError(f"{key}: {value.shape[0]} channels is not background + "
                                     "classes")
                value = value[1:]
            out[f"head.{name}.{m.group(2)}"] = value
            continue
        raise KeyError(f"unexpected key in a torchvision FCOS checkpoint: {key!r}")
    _towers_to_ours(towers, out)
    return out


def detectron2_to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """detectron2 ``FCOS`` (``{"model": state_dict}`` or the state dict) -> ours; an unknown key
    is a KeyError naming it."""
    out: StateDict = {}
    fpn: List[FPNEntry] = []
    towers: Dict[str, List[Tuple[int, str, Tensor]]] = {"cls_convs": [], "box_convs": []}
    for key, value in state_dict_of(checkpoint).items():
        if "anchor_generator" in key or key in ("pixel_mean", "pixel_std"):
            continue
        value = _as_tensor(value)
        mapped = detectron2_backbone_entry(key, value, fpn)
        if mapped is not None:
            out.update(mapped)
            continue
        m = re.match(r"head\.(cls_subnet|bbox_subnet)\.(\d+)\.(.+)$", key)
        if m:
            towers[_TOWERS[m.group(1)]].append((int(m.group(2)), m.group(3), value))
            continue
        if re.match(r"head\.(cls_score|bbox_pred|ctrness)\.(weight|bias)$", key):
            out[key] = value
            continue
        raise KeyError(f"unexpected key in a detectron2 FCOS checkpoint: {key!r}")
    out.update(detectron2_fpn_entries(fpn))
    _towers_to_ours(towers, out)
    return out


register_format_marks("FCOS", "torchvision", "head.classification_head.",
                      description="FCOS")
register_format_marks("FCOS", "detectron2", "head.cls_subnet.")
register_format_marks("FCOS", "ours", "head.cls_convs.")
register_family_marks("FCOS", "head.regression_head.bbox_ctrness.", "head.ctrness.")


def detect_format(checkpoint: Mapping[str, Any]) -> str:
    """"torchvision", "detectron2" or "ours" for an FCOS checkpoint, from its keys
    (``checkpoint_format``); a ValueError says what else it looks like."""
    return detect_checkpoint_format(checkpoint, "FCOS")


def to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """Any supported FCOS checkpoint (ours, torchvision's, detectron2's) -> ours."""
    fmt = detect_format(checkpoint)
    if fmt == "detectron2":
        return detectron2_to_ours(checkpoint)
    sd = state_dict_of(checkpoint)
    if fmt == "torchvision":
        return torchvision_to_ours(sd)
    return {k: _as_tensor(v) for k, v in sd.items()}
