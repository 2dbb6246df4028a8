"""Converters from other projects' ResNet parameter names to ours (see ``backbones.resnet``)."""

import re
from typing import Dict, Mapping

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
