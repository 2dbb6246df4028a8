"""Converting torchvision's and detectron2's Faster R-CNN checkpoints to our parameter names.

Our names: ``backbone.*`` (FPN: ``backbone.bottom_up.*``, ``backbone.lateral_convs.{i}``,
``backbone.output_convs.{i}``), ``rpn.head.convs.{j}``, ``rpn.head.objectness``,
``rpn.head.deltas``, ``roi_heads.box_head.convs.{j}.conv/.norm``, ``roi_heads.box_head.fcs.{j}``
(C4: ``roi_heads.box_head.res5.*``), ``roi_heads.box_predictor.cls_score`` (background last)
and ``roi_heads.box_predictor.bbox_pred`` (4 deltas per foreground class). Cascade R-CNN has
one of each per stage: ``roi_heads.box_head.{k}.fcs.{j}``, ``roi_heads.box_predictor.{k}.*``
(class-agnostic ``bbox_pred``), from detectron2's ``roi_heads.box_head.{k}.fc{j + 1}``.
Keypoint R-CNN adds ``roi_heads.keypoint_head.convs.{j}.conv`` and
``roi_heads.keypoint_head.score_lowres``, from torchvision's ``roi_heads.keypoint_head.{2j}``
and ``roi_heads.keypoint_predictor.kps_score_lowres`` or detectron2's
``roi_heads.keypoint_head.conv_fcn{j + 1}`` and ``roi_heads.keypoint_head.score_lowres``.
"""

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from backbones.convert import detectron2_resnet_to_ours, torchvision_resnet_to_ours

from .checkpoint_format import detect_format as detect_checkpoint_format
from .checkpoint_format import register_format_marks

StateDict = Dict[str, Tensor]


def _as_tensor(v: Any) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return torch.as_tensor(v)


FPNEntry = Tuple[str, int, str, str, Tensor]  # (lateral/output, level, conv/norm, rest, v)


def torchvision_backbone_entry(key: str, value: Tensor) -> Optional[StateDict]:
    """Ours for one of torchvision's detector backbone entries (``backbone.body.*`` ResNet,
    ``backbone.fpn.inner_blocks/layer_blocks`` (v1, or v2's conv/norm blocks), the top block's
    ``extra_blocks.p6/p7``); None for a key outside the backbone."""
    if key.startswith("backbone.body."):
        sub = torchvision_resnet_to_ours({key[len("backbone.body."):]: value})
        return {"backbone.bottom_up." + k: v for k, v in sub.items()}
    m = re.match(r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(?:(0|1)\.)?(.+)$", key)
    if m:
        kind, i, sub_i, rest = m.groups()
        dst = "lateral_convs" if kind == "inner" else "output_convs"
        return {f"backbone.{dst}.{i}.{'norm' if sub_i == '1' else 'conv'}.{rest}": value}
    m = re.match(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)$", key)
    if m:
        return {f"backbone.top_block.{m.group(1)}.{m.group(2)}": value}
    return None


def detectron2_backbone_entry(key: str, value: Tensor, fpn: List[FPNEntry]
                              ) -> Optional[StateDict]:
    """Ours for one of detectron2's FPN backbone entries (``backbone.bottom_up.*`` ResNet,
    ``backbone.top_block.p6/p7``); its ``fpn_lateral{l}``/``fpn_output{l}`` entries go to
    ``fpn`` (their index depends on the finest level, see ``detectron2_fpn_entries``) and
    give an empty dict; None for a key outside the FPN backbone."""
    if key.startswith("backbone.bottom_up."):
        sub = detectron2_resnet_to_ours({key[len("backbone.bottom_up."):]: value})
        return {"backbone.bottom_up." + k: v for k, v in sub.items()}
    m = re.match(r"backbone\.fpn_(lateral|output)(\d)\.(?:(norm)\.)?(.+)$", key)
    if m:
        kind, level, norm, rest = m.groups()
        fpn.append((kind, int(level), "norm" if norm else "conv", rest, value))
        return {}
    if re.match(r"backbone\.top_block\.(p6|p7)\.(weight|bias)$", key):
        return {key: value}
    return None


def detectron2_fpn_entries(fpn: List[FPNEntry]) -> StateDict:
    """Our names of detectron2's FPN convs, levels counted from the finest input (res2 for
    Faster R-CNN, res3 for RetinaNet)."""
    if not fpn:
        return {}
    finest = min(level for _, level, _, _, _ in fpn)
    return {f"backbone.{'lateral_convs' if kind == 'lateral' else 'output_convs'}."
            f"{level - finest}.{part}.{rest}": value for kind, level, part, rest, value in fpn}


def torchvision_to_ours(state_dict: Mapping[str, Any]) -> StateDict:
    """torchvision ``FasterRCNN`` (v1 or v2; published-file or today's names) -> ours.

    The predictor keeps all torchvision outputs: cls_score rows move background from first to
    last, and bbox_pred loses the background's 4 rows; label k is torchvision label k + 1.
    """
    out: StateDict = {}
    linear_heads: List[Tuple[int, str, Tensor]] = []
    for key, value in state_dict.items():
        value = _as_tensor(value)
        mapped = torchvision_backbone_entry(key, value)
        if mapped is not None:
            out.update(mapped)
            continue
        m = re.match(r"rpn\.head\.conv\.(?:(\d+)\.0\.)?(weight|bias)$", key)
        if m:
            out[f"rpn.head.convs.{m.group(1) or 0}.{m.group(2)}"] = value
            continue
        m = re.match(r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)$", key)
        if m:
            name = "objectness" if m.group(1) == "cls_logits" else "deltas"
            out[f"rpn.head.{name}.{m.group(2)}"] = value
            continue
        m = re.match(r"roi_heads\.box_head\.fc(6|7)\.(weight|bias)$", key)
        if m:
            out[f"roi_heads.box_head.fcs.{int(m.group(1)) - 6}.{m.group(2)}"] = value
            continue
        m = re.match(r"roi_heads\.keypoint_head\.(\d+)\.(weight|bias)$", key)
        if m and int(m.group(1)) % 2 == 0:  # Sequential of (conv, ReLU) pairs
            out[f"roi_heads.keypoint_head.convs.{int(m.group(1)) // 2}.conv.{m.group(2)}"] = value
            continue
        m = re.match(r"roi_heads\.keypoint_predictor\.kps_score_lowres\.(weight|bias)$", key)
        if m:
            out[f"roi_heads.keypoint_head.score_lowres.{m.group(1)}"] = value
            continue
        m = re.match(r"roi_heads\.box_head\.(\d+)\.(0|1)\.(.+)$", key)
        if m:  # v2: Conv2dNormActivation blocks
            part = "conv" if m.group(2) == "0" else "norm"
            out[f"roi_heads.box_head.convs.{m.group(1)}.{part}.{m.group(3)}"] = value
            continue
        m = re.match(r"roi_heads\.box_head\.(\d+)\.(weight|bias)$", key)
        if m:  # v2: the Linear layers after Flatten, renumbered below
            linear_heads.append((int(m.group(1)), m.group(2), value))
            continue
        if key == "roi_heads.box_predictor.cls_score.weight" or \
                key == "roi_heads.box_predictor.cls_score.bias":
            out[key] = torch.cat([value[1:], value[:1]])
            continue
        if key.startswith("roi_heads.box_predictor.bbox_pred."):
            out[key] = value[4:]
            continue
        raise KeyError(f"unexpected key in a torchvision Faster R-CNN checkpoint: {key!r}")
    for j, idx in enumerate(sorted({i for i, _, _ in linear_heads})):
        for i, name, value in linear_heads:
            if i == idx:
                out[f"roi_heads.box_head.fcs.{j}.{name}"] = value
    return out


def detectron2_to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """detectron2 ``GeneralizedRCNN`` (FPN or C4; ``{"model": state_dict}`` or the state dict)
    -> ours. The predictor layout (background last, K * 4 deltas) is already ours."""
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise TypeError("a detectron2 checkpoint is {'model': state_dict}")
    out: StateDict = {}
    fpn: List[FPNEntry] = []
    for key, value in state_dict.items():
        if "anchor_generator" in key or key in ("pixel_mean", "pixel_std"):
            continue
        value = _as_tensor(value)
        mapped = detectron2_backbone_entry(key, value, fpn)
        if mapped is not None:
            out.update(mapped)
            continue
        if key.startswith("backbone."):  # C4: the ResNet itself
            for k, v in detectron2_resnet_to_ours({key[len("backbone."):]: value}).items():
                out["backbone." + k] = v
            continue
        m = re.match(r"proposal_generator\.rpn_head\.conv\.(?:conv(\d+)\.)?(weight|bias)$", key)
        if m:
            out[f"rpn.head.convs.{m.group(1) or 0}.{m.group(2)}"] = value
            continue
        m = re.match(r"proposal_generator\.rpn_head\.(objectness_logits|anchor_deltas)\.(.+)$",
                     key)
        if m:
            name = "objectness" if m.group(1) == "objectness_logits" else "deltas"
            out[f"rpn.head.{name}.{m.group(2)}"] = value
            continue
        m = re.match(r"roi_heads\.box_head\.(?:(\d+)\.)?(conv|fc)(\d+)\.(?:(norm)\.)?(.+)$",
                     key)
        if m:  # Cascade R-CNN: box_head.{stage}.fc1
            stage, kind, j, norm, rest = m.groups()
            head = "roi_heads.box_head." + (f"{stage}." if stage else "")
            if kind == "fc":
                out[f"{head}fcs.{int(j) - 1}.{rest}"] = value
            else:
                part = "norm" if norm else "conv"
                out[f"{head}convs.{int(j) - 1}.{part}.{rest}"] = value
            continue
        m = re.match(r"roi_heads\.keypoint_head\.conv_fcn(\d+)\.(weight|bias)$", key)
        if m:
            out[f"roi_heads.keypoint_head.convs.{int(m.group(1)) - 1}.conv.{m.group(2)}"] = value
            continue
        if re.match(r"roi_heads\.keypoint_head\.score_lowres\.(weight|bias)$", key):
            out[key] = value
            continue
        if key.startswith("roi_heads.res5."):
            for k, v in detectron2_resnet_to_ours({key[len("roi_heads."):]: value}).items():
                out["roi_heads.box_head." + k] = v
            continue
        if key.startswith("roi_heads.box_predictor."):
            out[key] = value
            continue
        raise KeyError(f"unexpected key in a detectron2 Faster R-CNN checkpoint: {key!r}")
    out.update(detectron2_fpn_entries(fpn))
    return out


register_format_marks("GeneralizedRCNN", "detectron2", "proposal_generator.",
                      description="two-stage (R-CNN)")
register_format_marks("GeneralizedRCNN", "torchvision", "backbone.body.", "rpn.head.cls_logits")
register_format_marks("GeneralizedRCNN", "ours", "rpn.head.objectness")


def detect_format(checkpoint: Mapping[str, Any]) -> str:
    """"torchvision", "detectron2" or "ours" for an R-CNN checkpoint (Faster, Mask R-CNN and
    Panoptic FPN share the marks), from its keys (``checkpoint_format``)."""
    return detect_checkpoint_format(checkpoint, "GeneralizedRCNN")


def to_ours(checkpoint: Mapping[str, Any]) -> StateDict:
    """Any supported checkpoint -> our state dict."""
    fmt = detect_format(checkpoint)
    if fmt == "detectron2":
        return detectron2_to_ours(checkpoint)
    sd = checkpoint.get("model", checkpoint)
    if fmt == "torchvision":
        return torchvision_to_ours(sd)
    return {k: _as_tensor(v) for k, v in sd.items()}


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a converted state dict, exactly: every model parameter and buffer must be given
    and every given key used (``num_batches_tracked`` may be absent on either side). Shape
    mismatches name the key and both shapes."""
    own = model.state_dict()
    extra = [k for k in state_dict if k not in own and not k.endswith("num_batches_tracked")]
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    if extra or missing:
        raise KeyError(f"checkpoint does not fit the model: missing {missing[:10]} "
                       f"({len(missing)} in all), unexpected {extra[:10]} ({len(extra)} in all)")
    for k, v in state_dict.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                             f"model {tuple(own[k].shape)}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
