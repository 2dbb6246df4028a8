"""Converting torchvision's and detectron2's RetinaNet checkpoints to our parameter names.

Ours (:mod:`detection.modeling.retinanet`): ``backbone.bottom_up.*`` (the ResNet),
``backbone.lateral_convs.{i}`` / ``backbone.output_convs.{i}`` (``.conv``, ``.norm``; i = 0 for
res3), ``backbone.top_block.p6`` / ``.p7``, ``head.cls_convs.{i}`` / ``head.box_convs.{i}``
(``.conv``, ``.norm``), ``head.cls_score`` (``A * K`` channels, anchor-major) and
``head.bbox_pred``.

torchvision (``retinanet_resnet50_fpn`` v1 and ``_v2``): ``backbone.body.*``,
``backbone.fpn.inner_blocks.{i}[.0]`` / ``layer_blocks.{i}[.0]``, ``backbone.fpn.extra_blocks.
p6`` / ``.p7``, ``head.classification_head.conv.{i}.0`` (conv) and ``.{i}.1`` (v2's GroupNorm)
or, in the published v1 file, ``conv.{2i}``; ``head.classification_head.cls_logits`` with
``A * 91`` channels whose class 0 (background, never a target) is dropped, so that our label k
is torchvision's k + 1, as for Faster R-CNN; ``head.regression_head.conv.*`` and ``.bbox_reg``.

detectron2 (``retinanet_R_50_FPN_1x/3x``): ``backbone.bottom_up.*``, ``backbone.fpn_lateral{3-5}``
and ``fpn_output{3-5}`` (``.norm`` when normalized), ``backbone.top_block.p6`` / ``.p7``,
``head.cls_subnet.{j}`` / ``head.bbox_subnet.{j}`` (Sequentials of conv, [norm,] ReLU),
``head.cls_score`` and ``head.bbox_pred`` (K classes, no background).
"""

import re
from typing import Any, Dict, List, Mapping, Tuple

from torch import Tensor

from .checkpoint_format import detect_format as detect_checkpoint_format
from .checkpoint_format import register_format_marks, state_dict_of
from .convert import (
    FPNEntry,
    _as_tensor,
    detectron2_backbone_entry,
    detectron2_fpn_entries,
    torchvision_backbone_entry,
)

StateDict = Dict[str, Tensor]
_SUBNETS = {"classification_head": "cls_convs", "regression_head": "box_convs",
            "cls_subnet": "cls_convs", "bbox_subnet": "box_convs"}


_state_dict = state_dict_of


def torchvision_to_ours(state_dict: Mapping[str, Any]) -> StateDict:
    """torchvision ``RetinaNet`` (v1 or v2; published-file or today's names) -> ours."""
    reg = state_dict.get("head.regression_head.bbox_reg.weight")
    if reg is None:
        raise KeyError("not a torchvision RetinaNet checkpoint: no "
                       "'head.regression_head.bbox_reg.weight'")
    num_anchors = _as_tensor(reg).shape[0] // 4
    out: StateDict = {}
    for key, value in state_dict.items():
        value = _as_tensor(value)
        mapped = torchvision_backbone_entry(key, value)
        if mapped is not None:
            out.update(mapped)
            continue
        m = re.match(r"head\.(classification_head|regression_head)\.conv\.(\d+)\.(0|1)\.(.+)$",
                     key)
        if m:  # Conv2dNormActivation: .0 conv, .1 norm
            head, i, sub, rest = m.groups()
            part = "conv" if sub == "0" else "norm"
            out[f"head.{_SUBNETS[head]}.{i}.{part}.{rest}"] = value
            continue
        m = re.match(r"head\.(classification_head|regression_head)\.conv\.(\d+)\.(weight|bias)$",
                     key)
        if m:  # the published v1 file: Sequential(conv, relu, conv, relu, ...)
            head, j, rest = m.groups()
            out[f"head.{_SUBNETS[head]}.{int(j) // 2}.conv.{rest}"] = value
            continue
        m = re.match(r"head\.classification_head\.cls_logits\.(weight|bias)$", key)
        if m:  # (A * K_tv, ...) -> drop class 0 of each anchor
            k_tv = value.shape[0] // num_anchors
            if k_tv * num_anchors != value.shape[0] or k_tv < 2:
                raise ValueError(f"{key}: {value.shape[0]} channels is not {num_anchors} "
                                 "anchors x (background + classes)")
            kept = value.reshape(num_anchors, k_tv, *value.shape[1:])[:, 1:]
            out[f"head.cls_score.{m.group(1)}"] = kept.reshape(-1, *value.shape[1:])
            continue
        m = re.match(r"head\.regression_head\.bbox_reg\.(weight|bias)$", key)
        if m:
            out[f"head.bbox_pred.{m.group(1)}"] = value
            continue
        raise KeyError(f"unexpected key in a torchvision RetinaNet checkpoint: {key!r}")
    return out


def _detectron2_subnet(entries: List[Tuple[int, str, Tensor]], dst: str,
                       out: StateDict) -> None:
    """``(index in the Sequential, 'weight'/'bias'/..., tensor)`` of one subnet: the convs
    (4-d weights) in order; a norm belongs to the conv before it."""
    conv_positions = sorted({j for j, name, v in entries if name == "weight" and v.dim() == 4})
    for j, name, value in entries:
        if j in conv_positions:
            out[f"head.{dst}.{conv_positions.index(j)}.conv.{name}"] = value
            continue
        before = [p for p in conv_positions if p < j]
        if not before:
            raise KeyError(f"head subnet entry {j}.{name} precedes every conv")
        out[f"head.{dst}.{conv_positions.index(before[-1])}.norm.{name}"] = value


def detectron2_to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """detectron2 ``RetinaNet`` (``{"model": state_dict}`` or the state dict) -> ours."""
    state_dict = _state_dict(checkpoint)
    out: StateDict = {}
    fpn: List[FPNEntry] = []
    subnets: Dict[str, List[Tuple[int, str, Tensor]]] = {"cls_convs": [], "box_convs": []}
    for key, value in state_dict.items():
        if "anchor_generator" in key or key in ("pixel_mean", "pixel_std"):
            continue
        value = _as_tensor(value)
        mapped = detectron2_backbone_entry(key, value, fpn)
        if mapped is not None:
            out.update(mapped)
            continue
        m = re.match(r"head\.(cls_subnet|bbox_subnet)\.(\d+)\.(.+)$", key)
        if m:
            subnets[_SUBNETS[m.group(1)]].append((int(m.group(2)), m.group(3), value))
            continue
        if re.match(r"head\.(cls_score|bbox_pred)\.(weight|bias)$", key):
            out[key] = value
            continue
        raise KeyError(f"unexpected key in a detectron2 RetinaNet checkpoint: {key!r}")
    out.update(detectron2_fpn_entries(fpn))
    for dst, entries in subnets.items():
        _detectron2_subnet(entries, dst, out)
    return out


register_format_marks("RetinaNet", "torchvision", "head.classification_head.",
                      description="RetinaNet")
register_format_marks("RetinaNet", "detectron2", "head.cls_subnet.")
register_format_marks("RetinaNet", "ours", "head.cls_convs.")


def detect_format(checkpoint: Mapping[str, Any]) -> str:
    """"torchvision", "detectron2" or "ours" for a RetinaNet checkpoint, from its keys
    (``checkpoint_format``); a ValueError says what else it looks like."""
    return detect_checkpoint_format(checkpoint, "RetinaNet")


def to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """Any supported RetinaNet checkpoint (ours, torchvision's, detectron2's) -> ours."""
    fmt = detect_format(checkpoint)
    if fmt == "detectron2":
        return detectron2_to_ours(checkpoint)
    sd = _state_dict(checkpoint)
    if fmt == "torchvision":
        return torchvision_to_ours(sd)
    return {k: _as_tensor(v) for k, v in sd.items()}
