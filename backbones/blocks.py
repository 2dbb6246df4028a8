"""ResNet blocks and stages.

Parameter names (what converters map to):

    {i}.conv1 / bn1, conv2 / bn2            block convs and norms (conv3 / bn3 for bottlenecks)
    {i}.conv2.offset                        offset (and mask) conv of a deformable block
    {i}.downsample.0 / .1                   projection shortcut conv and norm
    {i}.downsample.1 / .2                   the same after the average pool of ``avg_down``

Each block declares ``conv_norm_pairs`` (each conv and the norm right after it, for folding)
and ``residual_convs`` (its main path in order, for fusion); nothing else reads its names.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from .norm import get_norm


class DeformConv2d(nn.Module):
    """A 3x3 deformable convolution (DCNv1, or DCNv2 when ``modulated``) whose offsets (and
    mask) come from a zero-initialised conv (detectron2 names it ``conv2_offset``)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int, dilation: int, groups: int,
        deform_groups: int = 1, modulated: bool = False,
    ) -> None:
        super().__init__()
        self.stride, self.dilation, self.padding = stride, dilation, dilation
        self.modulated, self.deform_groups = modulated, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.register_parameter("bias", None)
        offset_channels = deform_groups * (27 if modulated else 18)
        self.offset = nn.Conv2d(
            in_channels, offset_channels, 3, stride=stride, padding=dilation, dilation=dilation
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.offset(x)
        mask = None
        if self.modulated:
            n = 18 * self.deform_groups
            out, mask = out[:, :n], out[:, n:].sigmoid()
        return deform_conv2d(
            x, out, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1
    conv_norm_pairs: Tuple[Tuple[str, str], ...] = (("conv1", "bn1"), ("conv2", "bn2"))
    residual_convs = ("conv1", "conv2")

    def __init__(
        self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
        norm: str = "BN", groups: int = 1, width_per_group: int = 64,
        stride_in_1x1: bool = False, deform: bool = False, deform_modulated: bool = False,
        avg_down: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        if deform:
            raise ValueError("deformable convolution is supported in bottleneck blocks only")
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = get_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = get_norm(norm, planes)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm, avg_down)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, optionally deformable), 1x1 expand.

    ``stride_in_1x1`` puts the stride in the first 1x1 conv (the paper's and MSRA's layout,
    "caffe" style); otherwise it sits in the 3x3 conv (torchvision's, "pytorch" style).
    """

    expansion = 4
    conv_norm_pairs: Tuple[Tuple[str, str], ...] = (
        ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"),
    )
    residual_convs = ("conv1", "conv2", "conv3")

    def __init__(
        self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
        norm: str = "BN", groups: int = 1, width_per_group: int = 64,
        stride_in_1x1: bool = False, deform: bool = False, deform_modulated: bool = False,
        avg_down: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        s1x1, s3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=s1x1, bias=False)
        self.bn1 = get_norm(norm, width)
        if deform:
            self.conv2 = DeformConv2d(width, width, stride=s3x3, dilation=dilation,
                                      groups=groups, modulated=deform_modulated)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=s3x3, padding=dilation,
                                   dilation=dilation, groups=groups, bias=False)
        self.bn2 = get_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = get_norm(norm, out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm, avg_down)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str,
              avg_down: bool = False) -> Optional[nn.Sequential]:
    """None (identity) when shapes match; else a 1x1 projection and norm (``downsample.0/.1``)
    or, with ``avg_down`` (ResNet-D), a 2x2 average pool (an Identity at stride 1) before a
    stride-1 projection (``downsample.1/.2``: timm's and mmdetection's layout)."""
    if stride == 1 and in_channels == out_channels:
        return None
    if not avg_down:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            get_norm(norm, out_channels),
        )
    pool: nn.Module = nn.Identity() if stride == 1 else nn.AvgPool2d(
        stride, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(
        pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), get_norm(norm, out_channels),
    )


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(
    block: Union[str, type], num_blocks: int, in_channels: int, planes: int, *,
    stride: int = 2, dilation: int = 1, first_dilation: Optional[int] = None, norm: str = "BN",
    groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False,
    deform: bool = False, deform_modulated: bool = False, avg_down: bool = False,
) -> nn.Sequential:
    """One ResNet stage: ``num_blocks`` blocks, the first with ``stride``.

    ``first_dilation`` is the first block's dilation (torchvision keeps the previous stage's
    there; detectron2 uses ``dilation`` for every block, the default). Used by ``ResNet`` and
    on its own by the C4 detector, whose box head is res5.
    """
    block_cls = BLOCKS[block] if isinstance(block, str) else block
    blocks = []
    for i in range(num_blocks):
        d = first_dilation if (i == 0 and first_dilation is not None) else dilation
        blocks.append(block_cls(
            in_channels, planes, stride=stride if i == 0 else 1, dilation=d, norm=norm,
            groups=groups, width_per_group=width_per_group, stride_in_1x1=stride_in_1x1,
            deform=deform, deform_modulated=deform_modulated, avg_down=avg_down,
        ))
        in_channels = planes * block_cls.expansion
    return nn.Sequential(*blocks)
