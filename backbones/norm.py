"""Normalization layers by name, and folding of frozen BatchNorm into convolutions."""

from typing import Optional

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

NORMS = ("BN", "FrozenBN", "SyncBN", "GN", "none")


def get_norm(norm: str, channels: int, *, gn_groups: int = 32) -> nn.Module:
    """A normalization layer for ``channels`` channels by name: one of ``NORMS``."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        return nn.GroupNorm(gn_groups, channels)
    if norm in ("none", "", None):
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid norms are {', '.join(NORMS)}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d / SyncBatchNorm in ``module`` by a FrozenBatchNorm2d
    carrying the same affine parameters and running statistics. Returns the module
    (a new one when ``module`` itself is a BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


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


# (conv, norm) attribute pairs that our modules use: ResNet blocks and stem, FPN's ConvNorm.
_CONV_NORM_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv", "norm"))


@torch.no_grad()
def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every (Conv2d, FrozenBN or eval-mode BN) pair of our blocks, stem, FPN convs and
    shortcuts into one biased Conv2d, in place, for inference. Returns the model.

    Folding is exact algebra; in float32 the results differ from the unfolded model only by
    round-off. Do not train a folded model with BatchNorm semantics: the norms are gone.
    """
    for module in list(model.modules()):
        for conv_name, norm_name in _CONV_NORM_PAIRS:
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
        from .fused import fuse_conv_relu  # fused imports resnet, which imports this module

        fuse_conv_relu(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
