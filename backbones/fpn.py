"""Feature Pyramid Network (Lin et al., CVPR 2017) over any backbone with ``output_shape()``.

Parameter names: ``bottom_up.*`` (the wrapped backbone), ``lateral_convs.{i}.conv/.norm`` and
``output_convs.{i}.conv/.norm`` (i = 0 for the finest input level), ``top_block.p6/.p7``.
Outputs are named ``p{log2(stride)}``: p2..p5 for res2..res5, plus p6 (and p7) from the top
block.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone
from .fused import FusedConv2d
from .norm import get_norm
from .shape_spec import ShapeSpec


class ConvNorm(nn.Module):
    """A conv followed by an optional norm; the conv has a bias only without a norm, unless
    ``bias`` says otherwise (FCOS's heads put a biased conv before their GroupNorm).
    ``forward(x, addend)`` adds ``addend`` to the result (FPN's top-down sum), inside the
    conv once inference fusion has folded the norm (``fuse_conv_relu``)."""

    conv_norm_pairs = (("conv", "norm"),)
    addend_after_pairs = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str,
                 *, bias: Optional[bool] = None) -> None:
        super().__init__()
        use_norm = norm not in ("none", "", None)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=not use_norm if bias is None else bias)
        self.norm = get_norm(norm, out_channels) if use_norm else nn.Identity()
        nn.init.kaiming_uniform_(self.conv.weight, a=1)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    @property
    def fused_relu(self) -> bool:
        """Whether the conv applies a ReLU itself (a fused conv with its norm folded)."""
        return isinstance(self.norm, nn.Identity) and getattr(self.conv, "fused_relu", False)

    def forward(self, x: Tensor, addend: Optional[Tensor] = None) -> Tensor:
        if addend is not None and isinstance(self.conv, FusedConv2d):
            return self.conv(x, addend)  # its norm is folded; the add is a oneDNN post-op
        out = self.norm(self.conv(x))
        return out if addend is None else out + addend


class LastLevelMaxPool(nn.Module):
    """P6 as a stride-2 subsampling of P5 (kernel 1), as Faster R-CNN's FPN uses."""

    num_levels = 1
    in_feature = "p5"

    def forward(self, x: Tensor) -> List[Tensor]:
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """RetinaNet's P6 = conv3x3/2(source), P7 = conv3x3/2(relu(P6)); source is C5 or P5."""

    num_levels = 2

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "res5") -> None:
        super().__init__()
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> List[Tensor]:
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6))]


class FPN(Backbone):
    """Lateral 1x1 convs, nearest-neighbour top-down upsampling with sum fusion, 3x3 output
    convs, and an optional top block.

    Args:
        bottom_up: a Backbone (``forward`` -> dict, ``output_shape()``).
        out_channels: channels of every output level.
        in_features: bottom-up outputs to use, finest first (default: all that have a stride).
        norm: "none", "BN", "GN", "FrozenBN" or "SyncBN" after each lateral and output conv.
        top_block: "maxpool" (P6, Faster R-CNN), "p6p7" (RetinaNet), or None.
        top_block_in: for "p6p7", "c5" (the last bottom-up map) or "p5".
    """

    def __init__(
        self, bottom_up: Backbone, *, out_channels: int = 256,
        in_features: Optional[Sequence[str]] = None, norm: str = "none",
        top_block: Optional[str] = "maxpool", top_block_in: str = "c5",
    ) -> None:
        super().__init__()
        shapes = bottom_up.output_shape()
        if in_features is None:
            in_features = [k for k, s in shapes.items() if s.stride is not None]
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"FPN in_features {missing} are not outputs of the bottom-up "
                             f"backbone, which gives {list(shapes)}")
        strides = [shapes[f].stride for f in in_features]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"FPN needs strides doubling level to level, got {strides} for "
                             f"{list(in_features)}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.lateral_convs = nn.ModuleList(
            ConvNorm(shapes[f].channels, out_channels, 1, norm) for f in in_features
        )
        self.output_convs = nn.ModuleList(
            ConvNorm(out_channels, out_channels, 3, norm) for _ in in_features
        )
        names = [f"p{int(math.log2(s))}" for s in strides]
        out_shapes = {n: ShapeSpec(out_channels, s) for n, s in zip(names, strides)}
        last_stride = strides[-1]
        if top_block == "maxpool":
            self.top_block: Optional[nn.Module] = LastLevelMaxPool()
        elif top_block == "p6p7":
            if top_block_in == "c5":
                src, src_channels = self.in_features[-1], shapes[self.in_features[-1]].channels
            elif top_block_in == "p5":
                src, src_channels = names[-1], out_channels
            else:
                raise ValueError(f"top_block_in must be 'c5' or 'p5', got {top_block_in!r}")
            self.top_block = LastLevelP6P7(src_channels, out_channels, in_feature=src)
        elif top_block is None:
            self.top_block = None
        else:
            raise ValueError(f"unknown top_block {top_block!r}; valid: 'maxpool', 'p6p7', None")
        if self.top_block is not None:
            for _ in range(self.top_block.num_levels):
                last_stride *= 2
                out_shapes[f"p{int(math.log2(last_stride))}"] = ShapeSpec(out_channels,
                                                                        last_stride)
        self._level_names = names
        self._out_shapes = out_shapes
        self.size_divisibility = strides[-1]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        bottom = self.bottom_up(x)
        feats = [bottom[f] for f in self.in_features]
        inner = self.lateral_convs[-1](feats[-1])
        results = [self.output_convs[-1](inner)]
        for i in range(len(feats) - 2, -1, -1):
            top_down = F.interpolate(inner, size=feats[i].shape[-2:], mode="nearest")
            inner = self.lateral_convs[i](feats[i], top_down)  # lateral 1x1 conv + top-down
            results.insert(0, self.output_convs[i](inner))
        out = dict(zip(self._level_names, results))
        if self.top_block is not None:
            src_name = self.top_block.in_feature
            src = out[src_name] if src_name in out else bottom[src_name]
            for name, feat in zip(list(self._out_shapes)[len(results):], self.top_block(src)):
                out[name] = feat
        return out
