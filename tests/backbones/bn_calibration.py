"""Realistic BatchNorm statistics for random-weight parity tests (see shared FACTS: made-up
statistics blow activations up and a parity test then compares nothing)."""

import torch
from torch import nn


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """Give every BatchNorm the statistics of the activations it really sees (one train-mode
    pass with momentum 1), then jitter them, so that eval-mode outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
            nn.init.uniform_(m.weight, 0.5, 1.5, generator=gen)
            nn.init.uniform_(m.bias, -0.2, 0.2, generator=gen)
    model.train()
    model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean += 0.05 * torch.randn(m.running_mean.shape, generator=gen)
            m.running_var *= 1 + 0.1 * torch.rand(m.running_var.shape, generator=gen)
    model.eval()
