"""Normalization layers by name, and freezing BatchNorm into FrozenBatchNorm2d.

Folding norms into convolutions for inference is in ``backbones.inference``.
"""

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
