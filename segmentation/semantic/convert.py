"""torchvision's segmentation checkpoints (``fcn_resnet50/101``, ``deeplabv3_resnet50/101``)
-> our ``SemanticSegmentor`` parameter names.

torchvision names (``backbone`` is an IntermediateLayerGetter over its ResNet)::

    backbone.conv1 / bn1 / layer{1..4}.*            -> backbone.stem.* / res{2..5}.*
    DeepLabV3 classifier:
    classifier.0.convs.{i}.0 / .1  (i < last)       -> head.aspp.branches.{i}.conv / .norm
    classifier.0.convs.{last}.1 / .2 (pooling)      -> head.aspp.pooling.conv / .norm
    classifier.0.project.0 / .1                     -> head.aspp.project.conv / .norm
    classifier.1 / .2 / .4                          -> head.conv.conv / head.conv.norm /
                                                       head.predictor
    FCN classifier and every aux_classifier:
    {classifier,aux_classifier}.0 / .1 / .4         -> {head,aux_head}.conv.conv / .conv.norm /
                                                       .predictor
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from backbones.convert import torchvision_resnet_to_ours

__all__ = [
    "TORCHVISION_SEGMENTATION_WEIGHTS",
    "SegmentationLoadReport",
    "load_segmentation_weights",
    "torchvision_segmentation_to_ours",
]

StateDict = Dict[str, torch.Tensor]

# Registered names -> torchvision's weights enum member (resolved lazily: url, VOC categories).
TORCHVISION_SEGMENTATION_WEIGHTS = {
    "torchvision/fcn_resnet50": ("FCN_ResNet50_Weights", "COCO_WITH_VOC_LABELS_V1"),
    "torchvision/fcn_resnet101": ("FCN_ResNet101_Weights", "COCO_WITH_VOC_LABELS_V1"),
    "torchvision/deeplabv3_resnet50": ("DeepLabV3_ResNet50_Weights", "COCO_WITH_VOC_LABELS_V1"),
    "torchvision/deeplabv3_resnet101": ("DeepLabV3_ResNet101_Weights",
                                        "COCO_WITH_VOC_LABELS_V1"),
}


def _head_name(key: str, prefix: str, ours: str, deeplab: bool, last_branch: int) -> str:
    rest = key[len(prefix) + 1:]
    if deeplab and prefix == "classifier":
        m = re.fullmatch(r"0\.convs\.(\d+)\.(\d+)\.(.+)", rest)
        if m:
            i, j, param = int(m.group(1)), int(m.group(2)), m.group(3)
            if i == last_branch:  # pooling: 0 is the AdaptiveAvgPool2d
                return f"{ours}.aspp.pooling.{ {1: 'conv', 2: 'norm'}[j] }.{param}"
            return f"{ours}.aspp.branches.{i}.{ {0: 'conv', 1: 'norm'}[j] }.{param}"
        m = re.fullmatch(r"0\.project\.(\d+)\.(.+)", rest)
        if m:
            return f"{ours}.aspp.project.{ {0: 'conv', 1: 'norm'}[int(m.group(1))] }.{m.group(2)}"
        m = re.fullmatch(r"([124])\.(.+)", rest)
        if m:
            part = {"1": "conv.conv", "2": "conv.norm", "4": "predictor"}[m.group(1)]
            return f"{ours}.{part}.{m.group(2)}"
    else:
        m = re.fullmatch(r"([014])\.(.+)", rest)
        if m:
            part = {"0": "conv.conv", "1": "conv.norm", "4": "predictor"}[m.group(1)]
            return f"{ours}.{part}.{m.group(2)}"
    raise ValueError(f"unexpected key {key!r} in a torchvision segmentation checkpoint")


def torchvision_segmentation_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a torchvision FCN / DeepLabV3 (ResNet) state dict to ours; the architecture (FCN
    or DeepLabV3 head) is read from the keys. Raises ValueError on keys it does not know."""
    deeplab = any(k.startswith("classifier.0.convs.") for k in state_dict)
    branches = {int(m.group(1)) for k in state_dict
                if (m := re.match(r"classifier\.0\.convs\.(\d+)\.", k))}
    last_branch = max(branches) if branches else -1
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items()
                if k.startswith("backbone.")}
    out: StateDict = {f"backbone.{k}": v for k, v in torchvision_resnet_to_ours(backbone).items()}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        prefix = key.split(".", 1)[0]
        if prefix not in ("classifier", "aux_classifier"):
            raise ValueError(f"unexpected key {key!r} in a torchvision segmentation checkpoint")
        ours = "head" if prefix == "classifier" else "aux_head"
        out[_head_name(key, prefix, ours, deeplab, last_branch)] = value
    return out


@dataclass
class SegmentationLoadReport:
    """Keys of the model the checkpoint did not fill, and checkpoint keys the model has no
    place for (an auxiliary head the model was built without, for example)."""

    missing: List[str]
    unexpected: List[str]


def _read_state_dict(weights: str) -> StateDict:
    if weights in TORCHVISION_SEGMENTATION_WEIGHTS:
        import torchvision.models.segmentation as tvseg

        enum_name, member = TORCHVISION_SEGMENTATION_WEIGHTS[weights]
        url = getattr(getattr(tvseg, enum_name), member).url
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                  weights_only=True)
    if weights.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(weights, map_location="cpu", check_hash=True,
                                                  weights_only=True)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"segmentation weights {weights!r} are neither a file, a URL nor one of "
            f"{sorted(TORCHVISION_SEGMENTATION_WEIGHTS)}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state


def load_segmentation_weights(
    model: nn.Module, weights: "str | Mapping[str, torch.Tensor]", *, strict_shapes: bool = True,
) -> SegmentationLoadReport:
    """Load torchvision segmentation weights (a registered name such as
    ``torchvision/deeplabv3_resnet50``, a URL, a file, or a state dict) or a state dict of
    ours into ``model``. Shape mismatches raise ValueError naming the key and both shapes."""
    state = _read_state_dict(weights) if isinstance(weights, str) else dict(weights)
    if any(k.startswith(("classifier.", "aux_classifier.")) for k in state) or any(
        k.startswith("backbone.layer") for k in state
    ):
        state = torchvision_segmentation_to_ours(state)
    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched and strict_shapes:
        k, theirs, ours = mismatched[0]
        raise ValueError(f"shape mismatch for {k!r}: checkpoint {theirs}, model {ours} "
                         f"({len(mismatched)} mismatched keys in all; a different number of "
                         "classes needs MODEL.SEM_SEG_HEAD.NUM_CLASSES to match)")
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == own[k].shape}
    model.load_state_dict(usable, strict=False)
    report = SegmentationLoadReport(
        missing=sorted(k for k in own if k not in usable),
        unexpected=sorted(k for k in state if k not in own),
    )
    return report


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The class count of a torchvision or our segmentation state dict, or None."""
    for key in ("classifier.4.bias", "head.predictor.bias"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None
