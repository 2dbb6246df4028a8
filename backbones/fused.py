"""Inference-only fusion of convolution with its ReLU and residual add (oneDNN post-ops).

After frozen BatchNorm is folded into the convolutions, what is left around them on a CPU is
memory traffic: a ReLU pass over every activation and, in each residual block, an add pass.
oneDNN applies both inside the convolution ("post-ops"); PyTorch exposes that as
``torch.ops.mkldnn._convolution_pointwise``. ``fuse_conv_relu(model)`` swaps our ResNet
blocks and stem for fused versions that call it on CPU float32 (or bf16) inputs and fall back to the
plain ops elsewhere (CUDA, other dtypes, autograd), so the result is always the same function.

Nothing here knows our layer names. A module opts in by declaring, as class attributes:

- ``conv_norm_pairs``: (conv, norm) attribute names, each norm right after its conv; the
  folding in ``backbones.inference`` reads them;
- ``residual_convs``: a residual block's main-path convs in order (each followed by a ReLU,
  the last by the shortcut add and a ReLU), with the shortcut in ``downsample``: the block
  becomes a ``FusedBlock``;
- ``relu_after_pairs = True``: its forward runs every declared pair through
  ``conv_norm_relu`` (a stem); each folded conv becomes a ``FusedConv2d`` with the ReLU inside;
- ``addend_after_pairs = True``: its forward may add a tensor after a declared pair (FPN's
  lateral conv plus the top-down map); each folded conv becomes a ``FusedConv2d`` without a
  ReLU, which the module calls with the addend so that the add is a post-op.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from .winograd import (
    F6_MIN_PIXELS,
    MIN_CHANNELS,
    transform_weight,
    winograd_conv3x3,
    winograd_supported,
)


def _fusion_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


@functools.cache
def _onednn_bf16() -> bool:
    """oneDNN has bf16 kernels on this CPU (AVX-512 core or avx_ne_convert; on AVX2-only CPUs
    it refuses bf16 convolutions with an error)."""
    return _fusion_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _use_fused(x: Tensor, dtypes: tuple = (torch.float32,)) -> bool:
    return (x.device.type == "cpu" and x.dtype in dtypes
            and not (torch.is_grad_enabled() and x.requires_grad)
            and (x.dtype != torch.bfloat16 or _onednn_bf16()))


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
        self.weight_winograd: Optional[Tensor]
        self.register_buffer("weight_winograd", None, persistent=False)
        self.weight_winograd6: Optional[Tensor]  # F(6x6, 3x3), made at the first large map
        self.register_buffer("weight_winograd6", None, persistent=False)
        # Measured here: oneDNN's blocked weight layout made ahead of time
        # (mkldnn_reorder_conv2d_weight) was slower than a channels_last weight, which
        # prepare_for_inference gives every conv; so the weight stays a plain tensor.

    def use_winograd(self, min_channels: int) -> bool:
        """Run this conv as Winograd F(4x4, 3x3) on CPU float32 inputs from now on, F(6x6, 3x3)
        on maps of at least ``F6_MIN_PIXELS``, where it is a 3x3 stride-1 conv of at least
        ``min_channels`` channels (``backbones.winograd``). Returns whether it will (not for
        weights on another device: it is a CPU path)."""
        self.weight_winograd6 = None
        if self.weight.device.type != "cpu" or not winograd_supported(self, min_channels):
            return False
        self.weight_winograd = transform_weight(self.weight)
        return True

    def _winograd_weight(self, x: Tensor) -> Tensor:
        """F(4x4, 3x3)'s transformed weight, or F(6x6, 3x3)'s on a large map (made from the
        weight at its first large map: most convs never see one, and its 64 rows take 1.8x
        the memory of F(4x4)'s 36)."""
        if x.shape[2] * x.shape[3] < F6_MIN_PIXELS:
            return self.weight_winograd
        if self.weight_winograd6 is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, kept
                self.weight_winograd6 = transform_weight(self.weight, 6)
        return self.weight_winograd6

    def _winograd_pays(self, x: Tensor) -> bool:
        # Measured here: maps of at least about 40 tiles of 4x4 each (13x17 was as fast
        # direct; so were batches of small maps, the mask head's 100 RoIs of 14x14, where
        # oneDNN's direct conv runs at its best rate).
        return (self.weight_winograd is not None and x.dtype == torch.float32
                and self.weight.dtype == self.weight_winograd.dtype == torch.float32
                and x.dim() == 4 and ((x.shape[2] + 3) // 4) * ((x.shape[3] + 3) // 4) >= 40
                and not torch.jit.is_scripting() and not torch.jit.is_tracing())

    def forward(self, x: Tensor, other: Optional[Tensor] = None) -> Tensor:
        if self._winograd_pays(x) and _use_fused(x):
            return winograd_conv3x3(x, self._winograd_weight(x), self.bias, self.relu, other)
        # float32, and bf16 (a bf16 backbone: measured 1.7x faster than conv, add, ReLU)
        if _use_fused(x, (torch.float32, torch.bfloat16)) and self.weight.dtype == x.dtype:
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


def conv_norm_relu(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(conv(x)))``; a ``FusedConv2d`` (its norm folded, so ``norm`` is an
    Identity) applies the ReLU itself."""
    if getattr(conv, "fused_relu", False):
        return conv(x)
    return F.relu_(norm(conv(x)))


def _is_folded(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


class FusedBlock(nn.Module):
    """A folded residual block (one declaring ``residual_convs``): each conv with its ReLU,
    the last one with the shortcut add and ReLU. The shortcut keeps its pool, if any, and
    its folded conv."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        convs = [getattr(block, n) for n in block.residual_convs]
        if not all(type(c) is nn.Conv2d for c in convs):
            raise ValueError("only plain (non-deformable) convs can be fused")
        self.convs = nn.ModuleList(FusedConv2d(c, relu=True) for c in convs)
        shortcut = [] if block.downsample is None else [
            m for m in block.downsample if not isinstance(m, nn.Identity)]
        self.downsample: Optional[nn.Module] = (
            None if not shortcut else shortcut[0] if len(shortcut) == 1
            else nn.Sequential(*shortcut))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for conv in self.convs[:-1]:
            out = conv(out)
        return self.convs[-1](out, identity)


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def _norms_folded(module: nn.Module) -> bool:
    """Every declared norm of ``module`` is folded away, and its shortcut (if any) holds no
    norm layer any more."""
    pairs = getattr(module, "conv_norm_pairs", ())
    if not all(_is_folded(getattr(module, norm)) for _, norm in pairs):
        return False
    shortcut = getattr(module, "downsample", None)
    return shortcut is None or not any(
        isinstance(m, _NORM_TYPES) for m in shortcut.modules())


def _fusable_block(module: nn.Module) -> bool:
    return (bool(getattr(module, "residual_convs", ()))
            and all(type(getattr(module, n)) is nn.Conv2d for n in module.residual_convs)
            and _norms_folded(module))


@torch.no_grad()
def fuse_conv_relu(model: nn.Module) -> nn.Module:
    """In place, for inference: every already-folded residual block of ``model`` becomes a
    ``FusedBlock``, and every folded conv of a module declaring ``relu_after_pairs`` (a stem)
    a ``FusedConv2d`` with the ReLU inside.
    Blocks whose norms are not folded, or with deformable convs, are left as they are.
    Returns the model."""
    if not _fusion_available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _fusable_block(child):
                setattr(parent, name, FusedBlock(child))
    for module in list(model.modules()):
        relu = getattr(module, "relu_after_pairs", False)
        if not (relu or getattr(module, "addend_after_pairs", False)):
            continue
        for conv_name, norm_name in module.conv_norm_pairs:
            conv = getattr(module, conv_name)
            if type(conv) is nn.Conv2d and _is_folded(getattr(module, norm_name)):
                setattr(module, conv_name, FusedConv2d(conv, relu=relu))
    return model


def use_winograd(model: nn.Module, min_channels: int = MIN_CHANNELS, *,
                 float32_only: bool = False) -> int:
    """Every ``FusedConv2d`` of ``model`` that is a 3x3 stride-1 conv of at least
    ``min_channels`` input and output channels runs as Winograd F(4x4, 3x3) on CPU float32
    inputs, F(6x6, 3x3) on maps of at least ``F6_MIN_PIXELS`` (``backbones.winograd``); with
    ``float32_only``, only those whose weights are float32. Call it after the weights are final
    (F(4x4)'s transformed weights are computed now, F(6x6)'s at a conv's first large map).
    Returns how many convs will."""
    return sum(m.use_winograd(min_channels) for m in model.modules()
               if isinstance(m, FusedConv2d)
               and (not float32_only or m.weight.dtype == torch.float32))
