"""ResNet stems: what turns the image into the stride-4 input of res2.

A stem is an ``nn.Module`` with ``out_channels`` and ``stride`` attributes. Ours declare the
``conv_norm_pairs`` they run as conv -> norm -> ReLU (through ``conv_norm_relu``, hence
``relu_after_pairs``), so that folding (``backbones.inference``) and fusion
(``backbones.fused``) work on any stem without knowing its layer names.
``ResNet(stem=...)`` takes a name from ``STEMS`` or a built module.

Parameter names:

    classic: conv1 / bn1                              7x7/2, 3 -> 64
    deep:    conv1 / bn1, conv2 / bn2, conv3 / bn3   3x3/2 3 -> 32, 3x3 32 -> 32, 3x3 32 -> 64
"""

from typing import Dict, Tuple, Type

import torch.nn.functional as F
from torch import Tensor, nn

from .fused import conv_norm_relu
from .norm import get_norm


class ClassicStem(nn.Module):
    """7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max-pool: stride 4 in all (He et al.)."""

    conv_norm_pairs: Tuple[Tuple[str, str], ...] = (("conv1", "bn1"),)
    relu_after_pairs = True
    stride = 4

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN") -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_channels, ceil(H/4), ceil(W/4))."""
        x = conv_norm_relu(self.conv1, self.bn1, x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class DeepStem(nn.Module):
    """Three 3x3 convs (the first with stride 2), each with norm and ReLU, then a 3x3 stride-2
    max-pool: the ResNet-C/D stem (Bag of Tricks, He et al. 2019; timm's ``stem_type="deep"``,
    mmdetection's ``deep_stem``). ``mid_channels`` defaults to half of ``out_channels``
    (32 and 64, as timm's resnet50d)."""

    conv_norm_pairs: Tuple[Tuple[str, str], ...] = (
        ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"),
    )
    relu_after_pairs = True
    stride = 4

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN",
                 mid_channels: int = 0) -> None:
        super().__init__()
        mid = mid_channels or out_channels // 2
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False)
        self.bn1 = get_norm(norm, mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = get_norm(norm, mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 3, padding=1, bias=False)
        self.bn3 = get_norm(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_channels, ceil(H/4), ceil(W/4))."""
        for conv, norm in self.conv_norm_pairs:
            x = conv_norm_relu(getattr(self, conv), getattr(self, norm), x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


STEMS: Dict[str, Type[nn.Module]] = {"classic": ClassicStem, "deep": DeepStem}

# The name this module had inside backbones.resnet.
Stem = ClassicStem


def build_stem(name: str, in_channels: int = 3, out_channels: int = 64,
               norm: str = "BN") -> nn.Module:
    """The stem registered as ``name`` in ``STEMS``."""
    if name not in STEMS:
        raise ValueError(f"unknown stem {name!r}; valid stems: {', '.join(STEMS)} (or pass a "
                         "built module with out_channels and stride)")
    return STEMS[name](in_channels, out_channels, norm)
