"""Inference-only fusion of convolution with its ReLU and residual add (oneDNN post-ops).

After frozen BatchNorm is folded into the convolutions, what is left around them on a CPU is
memory traffic: a ReLU pass over every activation and, in each residual block, an add pass.
oneDNN applies both inside the convolution ("post-ops"); PyTorch exposes that as
``torch.ops.mkldnn._convolution_pointwise``. ``fuse_conv_relu(model)`` swaps our ResNet
blocks and stem for fused versions that call it on CPU float32 inputs and fall back to the
plain ops elsewhere (CUDA, other dtypes, autograd), so the result is always the same function.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import BasicBlock, Bottleneck, Stem


def _fusion_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _use_fused(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad))


class FusedConv2d(nn.Module):
    """``act(conv(x) [+ other])`` with act ReLU or none; made from a biased ``nn.Conv2d``."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("fusion needs numeric zero padding")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = self.fused_relu = relu
        # Measured here: oneDNN's blocked weight layout made ahead of time
        # (mkldnn_reorder_conv2d_weight) was slower than a channels_last weight, which
        # prepare_for_inference gives every conv; so the weight stays a plain tensor.

    def forward(self, x: Tensor, other: Optional[Tensor] = None) -> Tensor:
        if _use_fused(x) and self.weight.dtype == torch.float32:
            op = torch.ops.mkldnn._convolution_pointwise
            unary = "relu" if self.relu else "none"
            if other is None:
                return op(x, self.weight, self.bias, self.padding, self.stride,
                          self.dilation, self.groups, unary, [], "")
            other = other.contiguous(memory_format=torch.channels_last) \
                if x.is_contiguous(memory_format=torch.channels_last) else other.contiguous()
            return op.binary(x, other, self.weight, self.bias, self.padding, self.stride,
                             self.dilation, self.groups, "add", 1.0,
                             "relu" if self.relu else None, [], "")
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                       self.groups)
        if other is not None:
            out = out + other
        return F.relu(out) if self.relu else out


class FusedLinear(nn.Module):
    """``act(linear(x))`` through oneDNN's matmul with the ReLU as a post-op (about twice as
    fast as ``addmm`` on this kind of CPU for the box head's 12544 -> 1024 layer)."""

    def __init__(self, linear: nn.Linear, relu: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.relu = self.fused_relu = relu

    def forward(self, x: Tensor) -> Tensor:
        if _use_fused(x) and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias,
                                                      "relu" if self.relu else "none", [], "")
        out = F.linear(x, self.weight, self.bias)
        return F.relu(out) if self.relu else out


def apply_relu(module: nn.Module, x: Tensor) -> Tensor:
    """``relu(module(x))``, unless ``module`` is a fused layer that already applies it."""
    out = module(x)
    return out if getattr(module, "fused_relu", False) else F.relu(out)


class FusedBlock(nn.Module):
    """A folded BasicBlock or Bottleneck: each conv with its ReLU, the last one with the
    shortcut add and ReLU."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        names = ["conv1", "conv2", "conv3"] if isinstance(block, Bottleneck) else \
            ["conv1", "conv2"]
        convs = [getattr(block, n) for n in names]
        if not all(type(c) is nn.Conv2d for c in convs):
            raise ValueError("only plain (non-deformable) convs can be fused")
        self.convs = nn.ModuleList(FusedConv2d(c, relu=True) for c in convs)
        self.downsample = block.downsample[0] if block.downsample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for conv in self.convs[:-1]:
            out = conv(out)
        return self.convs[-1](out, identity)


class FusedStem(nn.Module):
    def __init__(self, stem: Stem) -> None:
        super().__init__()
        self.conv1 = FusedConv2d(stem.conv1, relu=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


def _folded(block: nn.Module) -> bool:
    norms = [getattr(block, n, None) for n in ("bn1", "bn2", "bn3")]
    ds = block.downsample
    ds_ok = ds is None or (len(ds) == 2 and isinstance(ds[1], nn.Identity))
    return all(n is None or isinstance(n, nn.Identity) for n in norms) and ds_ok


@torch.no_grad()
def fuse_conv_relu(model: nn.Module) -> nn.Module:
    """Replace, in place, every already-folded ResNet block and stem of ``model`` by its fused
    version (inference only). Blocks whose norms are not folded, or with deformable convs,
    are left as they are. Returns the model."""
    if not _fusion_available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (BasicBlock, Bottleneck)) and _folded(child) and \
                    all(type(getattr(child, n, nn.Conv2d(1, 1, 1))) is nn.Conv2d
                        for n in ("conv1", "conv2", "conv3")):
                setattr(parent, name, FusedBlock(child))
            elif isinstance(child, Stem) and isinstance(child.bn1, nn.Identity):
                setattr(parent, name, FusedStem(child))
    return model
