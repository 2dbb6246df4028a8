"""Semantic segmentation heads: feature maps in, per-class logits at the head's stride out.

Every head takes the backbone's ``dict[str, Tensor]`` and reads the maps named in its
``in_features``; ``forward`` returns logits ``(N, num_classes, H / s, W / s)`` where ``s`` is the
head's ``output_stride``. The meta-architecture upsamples them to the input.

- :class:`SemanticFPNHead`: Panoptic FPN's semantic branch (Kirillov et al., CVPR 2019) over
  p2..p5.
- :class:`DeepLabV3Head`: ASPP with image pooling, a 3x3 conv and a 1x1 classifier on a dilated
  ResNet (Chen et al., 2017), laid out as torchvision's ``DeepLabHead``.
- :class:`FCNHead`: a 3x3 conv to a quarter of the channels, dropout, 1x1 classifier
  (torchvision's ``FCNHead``, also its auxiliary classifier).

Parameter names (what ``segmentation.semantic.convert`` maps to)::

    scale_heads.{feature}.{i}.conv / .norm     SemanticFPNHead, one ConvNormReLU per step
    predictor                                   every head's 1x1 classifier
    aspp.branches.{i}.conv / .norm              DeepLabV3Head: 1x1, then one per rate
    aspp.pooling.conv / .norm                   image pooling branch
    aspp.project.conv / .norm                   1x1 projection of the concatenation
    conv.conv / conv.norm                       DeepLabV3Head's and FCNHead's 3x3 conv
"""

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones import ShapeSpec, get_norm
from backbones.fused import conv_norm_relu

__all__ = ["ASPP", "ConvNormReLU", "DeepLabV3Head", "FCNHead", "SemanticFPNHead"]


def _uses_norm(norm: str) -> bool:
    return norm not in ("", "none", None)


class ConvNormReLU(nn.Module):
    """conv (k x k, optional dilation) -> norm -> ReLU; the conv has a bias only without a
    norm."""

    conv_norm_pairs = (("conv", "norm"),)  # inference folding and fusion (detection.optimize)
    relu_after_pairs = True

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, norm: str,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                              dilation=dilation, bias=not _uses_norm(norm))
        self.norm = get_norm(norm, out_channels) if _uses_norm(norm) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return conv_norm_relu(self.conv, self.norm, x)


def _check_features(features: Dict[str, Tensor], names: Sequence[str], who: str) -> None:
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(f"{who} needs feature maps {list(names)}; missing {missing}, "
                       f"the backbone gave {list(features)}")


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch.

    Each input level at stride ``s`` goes through ``max(1, log2(s / common_stride))`` steps of
    3x3 conv + norm + ReLU, each step but a stride-``common_stride`` level's followed by a 2x
    bilinear upsampling; the results (all at ``common_stride``) are summed and a 1x1 conv gives
    the logits ``(N, num_classes, H / common_stride, W / common_stride)``.

    Args:
        input_shape: name -> ShapeSpec of the inputs (e.g. p2..p5 of an FPN).
        num_classes: output channels.
        conv_dims: channels of every 3x3 conv.
        common_stride: the stride the levels are brought to (4 for p2).
        norm: norm after each conv: "GN" (32 groups), "BN", ..., or "none".
    """

    def __init__(
        self, input_shape: Dict[str, ShapeSpec], *, num_classes: int, conv_dims: int = 128,
        common_stride: int = 4, norm: str = "GN",
    ) -> None:
        super().__init__()
        self.in_features = list(input_shape)
        self.common_stride = self.output_stride = common_stride
        self.scale_heads = nn.ModuleDict()
        for name, spec in input_shape.items():
            if spec.stride is None or spec.stride < common_stride:
                raise ValueError(f"feature {name!r} has stride {spec.stride}; SemanticFPNHead "
                                 f"needs strides >= common_stride {common_stride}")
            steps = max(1, int(math.log2(spec.stride) - math.log2(common_stride)))
            self.scale_heads[name] = nn.ModuleList(
                ConvNormReLU(spec.channels if i == 0 else conv_dims, conv_dims, 3, norm=norm)
                for i in range(steps)
            )
        self._upsample = {n: s.stride != common_stride for n, s in input_shape.items()}
        self.predictor = nn.Conv2d(conv_dims, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)  # start near uniform class scores

    def forward(self, features: Dict[str, Tensor]) -> Tensor:
        """features: name -> (N, C_l, H_l, W_l) -> logits (N, K, H_0, W_0), where level 0 is
        the first in ``in_features`` (at ``common_stride``)."""
        _check_features(features, self.in_features, type(self).__name__)
        out = None
        for name in self.in_features:
            x = features[name]
            for conv in self.scale_heads[name]:
                x = conv(x)
                if self._upsample[name]:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            # odd sizes: a level's 2x upsampling can exceed the finest level by a pixel
            if out is None:
                out = x
            else:
                out = out + x[..., : out.shape[-2], : out.shape[-1]]
        return self.predictor(out)


class ASPPPooling(nn.Module):
    """Image pooling branch: global average, 1x1 conv + norm + ReLU, broadcast back."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=not _uses_norm(norm))
        self.norm = get_norm(norm, out_channels) if _uses_norm(norm) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_channels, H, W), constant over H and W."""
        size = x.shape[-2:]
        y = F.relu(self.norm(self.conv(F.adaptive_avg_pool2d(x, 1))))
        # bilinear from 1x1 is a broadcast; torchvision interpolates, which gives the same
        return y.expand(-1, -1, size[0], size[1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, a 3x3 branch per rate, image pooling,
    concatenated and projected by 1x1 conv + norm + ReLU, then dropout."""

    def __init__(
        self, in_channels: int, rates: Sequence[int], *, out_channels: int = 256,
        norm: str = "BN", dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvNormReLU(in_channels, out_channels, 1, norm=norm)]
            + [ConvNormReLU(in_channels, out_channels, 3, norm=norm, dilation=int(r))
               for r in rates]
        )
        # GN statistics over a 1x1 map are those of its channels; BN needs batch > 1 in training
        self.pooling = ASPPPooling(in_channels, out_channels, norm=norm)
        self.project = ConvNormReLU((len(rates) + 2) * out_channels, out_channels, 1, norm=norm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_channels, H, W)."""
        outs: List[Tensor] = [b(x) for b in self.branches]
        outs.append(self.pooling(x))
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class DeepLabV3Head(nn.Module):
    """ASPP -> 3x3 conv + norm + ReLU -> 1x1 classifier, on one (dilated) feature map.

    torchvision's rates are (12, 24, 36) at output stride 8; the paper's are (6, 12, 18) at
    output stride 16.

    Args:
        input_shape: ShapeSpec of the one input map.
        in_feature: its name (e.g. "res5").
        num_classes: output channels.
        rates: ASPP dilation rates.
        channels: width of ASPP and the 3x3 conv (256).
        norm: "BN" as torchvision, or "GN", "SyncBN", ...
        dropout: after the ASPP projection (0.5 as torchvision).
    """

    def __init__(
        self, input_shape: ShapeSpec, *, in_feature: str, num_classes: int,
        rates: Sequence[int] = (12, 24, 36), channels: int = 256, norm: str = "BN",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.in_features = [in_feature]
        self.output_stride = input_shape.stride
        self.aspp = ASPP(input_shape.channels, rates, out_channels=channels, norm=norm,
                         dropout=dropout)
        self.conv = ConvNormReLU(channels, channels, 3, norm=norm)
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Dict[str, Tensor]) -> Tensor:
        """features[in_feature]: (N, C, h, w) -> logits (N, K, h, w)."""
        _check_features(features, self.in_features, type(self).__name__)
        return self.predictor(self.conv(self.aspp(features[self.in_features[0]])))


class FCNHead(nn.Module):
    """3x3 conv to ``in_channels // 4`` + norm + ReLU, dropout, 1x1 classifier (torchvision's
    FCN head and auxiliary classifier).

    Args:
        input_shape: ShapeSpec of the input map.
        in_feature: its name ("res5" for FCN, "res4" for the auxiliary head).
        num_classes: output channels.
        norm: "BN" as torchvision.
        dropout: before the classifier (0.1 as torchvision).
    """

    def __init__(
        self, input_shape: ShapeSpec, *, in_feature: str, num_classes: int, norm: str = "BN",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_features = [in_feature]
        self.output_stride = input_shape.stride
        inter = input_shape.channels // 4
        self.conv = ConvNormReLU(input_shape.channels, inter, 3, norm=norm)
        self.dropout = nn.Dropout(dropout)
        self.predictor = nn.Conv2d(inter, num_classes, 1)

    def forward(self, features: Dict[str, Tensor]) -> Tensor:
        """features[in_feature]: (N, C, h, w) -> logits (N, K, h, w)."""
        _check_features(features, self.in_features, type(self).__name__)
        return self.predictor(self.dropout(self.conv(features[self.in_features[0]])))
