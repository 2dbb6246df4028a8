"""Giving randomly initialised models realistic normalization statistics, so that parity tests
and benchmarks on random weights see full sets of detections instead of overflowing
activations."""

from typing import Callable

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def textured_image(height: int, width: int, *, noise: float = 0.1,
                   generator: torch.Generator) -> torch.Tensor:
    """A ``(3, H, W)`` RGB image on a 0-255 scale: smooth colour regions (random values on an
    eighth-size grid, bilinearly upsampled) plus pixel noise. Calibrating on such images gives
    statistics under which random-weight detectors produce many, well-spread detections."""
    coarse = torch.rand(3, max(height // 8, 1), max(width // 8, 1), generator=generator)
    img = torch.nn.functional.interpolate(coarse[None], size=(height, width),
                                          mode="bilinear")[0]
    img = img + noise * torch.rand(3, height, width, generator=generator)
    return (img.clamp(0, 1) * 255).round()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, run: Callable[[], object], *, jitter: float = 0.1,
                        seed: int = 0) -> nn.Module:
    """Set every BatchNorm / FrozenBatchNorm's running mean and variance to those of the
    activations it receives during ``run()`` (one forward pass), times a random factor
    ``1 +- jitter``; give the affine weights random values near 1 and biases near 0.
    The model should be in eval mode. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules()
             if isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm))]

    def hook(module: nn.Module, inputs) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dim=dims), x.var(dim=dims)
        c = mean.numel()

        def noise() -> torch.Tensor:
            return 1 + jitter * (2 * torch.rand(c, generator=gen) - 1)

        module.running_mean.copy_(mean * noise().to(mean))
        module.running_var.copy_(var * noise().to(var) + 1e-3)
        module.weight.copy_(noise().to(mean))
        module.bias.copy_((0.1 * jitter * torch.randn(c, generator=gen)).to(mean))

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return model
