"""Turning a trained model into an inference one: norms folded into the convolutions before
them, ReLUs and residual adds fused into the convolutions (``backbones.fused``), channels_last.
"""

from typing import Optional

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from .fused import fuse_conv_relu


def _affine_of(norm: nn.Module) -> Optional[tuple]:
    """(scale, shift) of a per-channel affine norm layer at inference, or None."""
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training:
        if norm.running_var is None:
            return None
        w = norm.weight if norm.affine else torch.ones_like(norm.running_var)
        b = norm.bias if norm.affine else torch.zeros_like(norm.running_var)
        scale = w * (norm.running_var + norm.eps).rsqrt()
        return scale, b - norm.running_mean * scale
    return None


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> Optional[nn.Conv2d]:
    """A new Conv2d equal to ``norm(conv(x))``, or None when ``norm`` cannot be folded."""
    affine = _affine_of(norm)
    if affine is None:
        return None
    scale, shift = affine
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(bias * scale + shift)
    return fused


@torch.no_grad()
def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every (Conv2d, FrozenBN or eval-mode BN) pair into one biased Conv2d, in place,
    for inference. Returns the model.

    The pairs are those a module declares in its ``conv_norm_pairs`` class attribute (our
    blocks, stems and FPN convs; any module of yours can declare its own), plus each Conv2d
    followed by a norm inside an ``nn.Sequential`` (shortcuts).

    Folding is exact algebra; in float32 the results differ from the unfolded model only by
    round-off. Do not train a folded model with BatchNorm semantics: the norms are gone.
    """
    for module in list(model.modules()):
        for conv_name, norm_name in getattr(module, "conv_norm_pairs", ()):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if type(conv) is nn.Conv2d and isinstance(norm, nn.Module):
                fused = fold_conv_norm(conv, norm)
                if fused is not None:
                    setattr(module, conv_name, fused)
                    setattr(module, norm_name, nn.Identity())
        if isinstance(module, nn.Sequential) and len(module) >= 2:
            for i in range(len(module) - 1):
                if type(module[i]) is nn.Conv2d:
                    fused = fold_conv_norm(module[i], module[i + 1])
                    if fused is not None:
                        module[i] = fused
                        module[i + 1] = nn.Identity()
    return model


def prepare_for_inference(model: nn.Module, *, channels_last: bool = True,
                          fuse: bool = True) -> nn.Module:
    """Eval mode, frozen norms folded into convs, (optionally) channels_last memory layout,
    which oneDNN's CPU convolutions and cuDNN's tensor-core kernels run faster, and (with
    ``fuse``) each ResNet block's ReLUs and residual add applied inside its convolutions
    (``backbones.fused``). Inference only."""
    model.eval()
    fold_frozen_batchnorm(model)
    if fuse:
        fuse_conv_relu(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
