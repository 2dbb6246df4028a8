"""Converters from other projects' ResNet parameter names to ours (see ``backbones.resnet``)."""

import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch

StateDict = Dict[str, torch.Tensor]


def torchvision_resnet_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """torchvision ``ResNet`` names (conv1, bn1, layer1..4, fc) -> ours (stem, res2..5, fc).
    Keys that are not part of a torchvision ResNet are passed through unchanged."""
    out: StateDict = {}
    for key, value in state_dict.items():
        new = key
        if key.startswith(("conv1.", "bn1.")):
            new = "stem." + key
        else:
            m = re.match(r"layer([1-4])\.(.*)", key)
            if m:
                new = f"res{int(m.group(1)) + 1}.{m.group(2)}"
        out[new] = value
    return out


def detectron2_resnet_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """detectron2 ``ResNet`` names -> ours.

    ``stem.conv1.norm.*`` -> ``stem.bn1.*``; ``resK.i.convJ.norm.*`` -> ``resK.i.bnJ.*``;
    ``resK.i.shortcut.weight`` / ``.norm.*`` -> ``resK.i.downsample.0.weight`` / ``.1.*``;
    ``resK.i.conv2_offset.*`` -> ``resK.i.conv2.offset.*``; ``linear.*`` -> ``fc.*``.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        new = re.sub(r"^stem\.conv1\.norm\.", "stem.bn1.", key)
        new = re.sub(r"\.conv([123])\.norm\.", r".bn\1.", new)
        new = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", new)
        new = re.sub(r"\.shortcut\.(weight|bias)$", r".downsample.0.\1", new)
        new = re.sub(r"\.conv2_offset\.", ".conv2.offset.", new)
        new = re.sub(r"^linear\.", "fc.", new)
        out[new] = value
    return out


# MSRA / Detectron (Caffe2) ResNet blob names. Norms are affine only: ``_bn_s`` (scale) and
# ``_bn_b`` (bias), the statistics folded in; some files also carry ``_bn_rm`` / ``_bn_riv``,
# which detectron2 reads as running mean and running variance.
_C2_NORM_SUFFIX = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_C2_BRANCH2 = {"a": "1", "b": "2", "c": "3"}
_C2_HEADS = ("pred", "fc1000")


def _caffe2_name(key: str) -> str:
    """One Caffe2 blob name -> ours; names it does not know come back unchanged."""
    if key in ("conv1_w", "conv1_b"):
        return "stem.conv1." + ("weight" if key.endswith("_w") else "bias")
    m = re.fullmatch(r"res_conv1_bn_(s|b|rm|riv)", key)
    if m:
        return "stem.bn1." + _C2_NORM_SUFFIX[m.group(1)]
    m = re.fullmatch(r"(pred|fc1000)_(w|b)", key)
    if m:
        return "fc." + ("weight" if m.group(2) == "w" else "bias")
    m = re.fullmatch(r"res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|b|bn_s|bn_b|bn_rm|bn_riv)", key)
    if not m:
        return key
    stage, index, branch, kind = m.groups()
    block = f"res{stage}.{index}"
    if kind in ("w", "b"):
        param = "weight" if kind == "w" else "bias"
        conv = "downsample.0" if branch == "1" else f"conv{_C2_BRANCH2[branch[1]]}"
        return f"{block}.{conv}.{param}"
    param = _C2_NORM_SUFFIX[kind[3:]]
    norm = "downsample.1" if branch == "1" else f"bn{_C2_BRANCH2[branch[1]]}"
    return f"{block}.{norm}.{param}"


def caffe2_resnet_to_ours(
    blobs: Mapping[str, torch.Tensor], *, eps: float = 1e-5
) -> StateDict:
    """MSRA / Detectron Caffe2 blob names (the ``R-50.pkl`` ImageNet files) -> ours.

    ``conv1_w`` -> ``stem.conv1.weight``; ``res_conv1_bn_s``/``_b`` -> ``stem.bn1.weight``/
    ``bias``; ``resK_I_branch1_w`` -> ``resK.I.downsample.0.weight`` and its ``_bn_s``/``_b``
    -> ``downsample.1``; ``branch2a``/``2b``/``2c`` -> ``conv1``/``conv2``/``conv3`` and
    ``bn1``/``bn2``/``bn3``; ``pred_w``/``pred_b`` -> ``fc``. ``*_momentum`` blobs are dropped.

    The files' norms are affine only (``y = s * x + b``). A FrozenBatchNorm2d or BatchNorm2d
    computes ``w * (x - mean) / sqrt(var + eps) + b``, so each norm without statistics gets
    ``running_mean = 0`` and ``running_var = 1 - eps`` (``eps`` of our norms, 1e-5 for both
    torchvision's FrozenBatchNorm2d and BatchNorm2d): the norm is then exactly ``s * x + b``.
    """
    out: StateDict = {}
    for key, value in blobs.items():
        if key.endswith("_momentum"):
            continue
        out[_caffe2_name(key)] = value
    norms = {k[: -len(".weight")] for k in out if re.search(r"(\.bn\d|downsample\.1)\.weight$", k)}
    for norm in sorted(norms):
        scale = out[f"{norm}.weight"]
        if f"{norm}.running_mean" not in out:
            out[f"{norm}.running_mean"] = torch.zeros_like(scale)
        if f"{norm}.running_var" not in out:
            out[f"{norm}.running_var"] = torch.full_like(scale, 1.0 - eps)
    return out


# timm ResNet features that our ResNet does not implement: (key pattern, what it is).
_TIMM_UNSUPPORTED = (
    (r"\.(se|attn)\.", "squeeze-excitation / attention modules"),
    (r"^conv1\.(?![01346]\.)\d+\.", "a stem other than the deep stem of ResNet-C/D"),
)
# timm's deep stem (``stem_type="deep"``): conv1 = Sequential(conv, bn, act, conv, bn, act,
# conv), then bn1 -> ours (``backbones.stems.DeepStem``).
_TIMM_DEEP_STEM = {"conv1.0.": "stem.conv1.", "conv1.1.": "stem.bn1.", "conv1.3.": "stem.conv2.",
                   "conv1.4.": "stem.bn2.", "conv1.6.": "stem.conv3.", "bn1.": "stem.bn3."}


def timm_resnet_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm ``ResNet`` names -> ours.

    timm's plain ResNets (``resnet50.a1_in1k``, ``resnet50.tv_in1k`` ...) use torchvision's
    names (``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``, ``fc``). ResNet-D
    (``resnet50d``) has a deep stem, ``conv1.{0,1,3,4,6}`` and ``bn1`` -> ``stem.conv1/bn1,
    conv2/bn2, conv3/bn3``, and average-pool shortcuts, whose ``downsample.1/.2`` (conv,
    norm after the pool) keep their names. Attention modules and other stems have no
    counterpart here: refused with a ValueError naming the first such key.
    """
    for key in state_dict:
        for pattern, what in _TIMM_UNSUPPORTED:
            if re.search(pattern, key):
                raise ValueError(
                    f"timm checkpoint key {key!r} belongs to {what}, which this ResNet does "
                    "not implement; use a plain timm ResNet or ResNet-D (resnet50.a1_in1k, "
                    "resnet50d.ra2_in1k)"
                )
    if "conv1.0.weight" not in state_dict:
        return torchvision_resnet_to_ours(state_dict)
    out: StateDict = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _TIMM_DEEP_STEM if key.startswith(p)), None)
        if prefix is not None:
            out[_TIMM_DEEP_STEM[prefix] + key[len(prefix):]] = value
        else:
            out.update(torchvision_resnet_to_ours({key: value}))
    return out


# Key formats ``detect_format`` tells apart, and their converters.
FORMATS = ("caffe2", "detectron2", "torchvision", "timm", "ours")


def detect_format(keys: Iterable[str]) -> str:
    """Which naming a ResNet state dict uses, from its keys: "caffe2" (MSRA ``.pkl``),
    "detectron2", "torchvision" (also timm's plain ResNets), "timm" (timm's deep-stem
    ResNet-D) or "ours". Raises ValueError when none fits, showing a few keys."""
    keys = list(keys)
    key_set = set(keys)
    if "conv1_w" in key_set or "res_conv1_bn_s" in key_set or any(
        re.match(r"res\d_\d+_branch", k) for k in keys
    ):
        return "caffe2"
    if any(k.startswith("stem.conv1.norm.") or ".shortcut." in k or ".conv1.norm." in k
           for k in keys):
        return "detectron2"
    if "stem.bn1.weight" in key_set or any(re.match(r"res[2-5]\.\d+\.", k) for k in keys):
        return "ours"
    if "conv1.0.weight" in key_set:
        return "timm"
    if "conv1.weight" in key_set or any(
        k.startswith("layer1.") for k in keys
    ):
        return "torchvision"
    raise ValueError(
        "cannot tell the parameter naming of this checkpoint (not torchvision/timm, detectron2, "
        f"MSRA Caffe2 or ours); first keys: {keys[:5]}"
    )


def convert_to_ours(
    state_dict: Mapping[str, torch.Tensor], source: Optional[str] = None
) -> Tuple[StateDict, str]:
    """Convert ``state_dict`` from ``source`` naming (one of ``FORMATS``; detected from the
    keys when None) to ours. Returns the converted dict and the format used."""
    fmt = detect_format(state_dict) if source is None else source
    converters = {
        "caffe2": caffe2_resnet_to_ours,
        "detectron2": detectron2_resnet_to_ours,
        "torchvision": torchvision_resnet_to_ours,
        "timm": timm_resnet_to_ours,
        "ours": dict,
    }
    if fmt not in converters:
        raise ValueError(f"unknown checkpoint format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return converters[fmt](state_dict), fmt


def to_tensors(values: Mapping[str, Any]) -> StateDict:
    """A name -> array mapping (numpy arrays or scalars, tensors) as a name -> tensor dict.
    Entries that are not numeric arrays (strings, nested dicts) are left out."""
    out: StateDict = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biuf":
            out[key] = torch.from_numpy(np.array(value, copy=True))
    return out
