"""The backbone contract shared by every model in this package."""

from typing import Dict, Optional

from torch import Tensor, nn

from .shape_spec import ShapeSpec

# ImageNet statistics on a 0-255 RGB scale: the default normalization of torchvision's weights.
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


class Backbone(nn.Module):
    """A module mapping a normalized ``(N, 3, H, W)`` batch to named feature maps.

    Subclasses set ``self._out_shapes`` (name -> ShapeSpec, in output order) and may set
    ``size_divisibility`` (inputs padded to a multiple of it give aligned feature maps).
    The normalization its weights expect is the weights' metadata (``backbones.WEIGHTS``);
    detectors take it from their config.
    """

    size_divisibility: int = 0

    def __init__(self) -> None:
        super().__init__()
        self._out_shapes: Dict[str, ShapeSpec] = {}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """name -> ShapeSpec(channels, stride) of every output, in output order."""
        return dict(self._out_shapes)

    @property
    def out_features(self):
        return list(self._out_shapes)

    @property
    def out_channels(self) -> Optional[int]:
        """The common channel count of all outputs (what torchvision's detectors read), or
        None when outputs differ in channels."""
        channels = {s.channels for s in self._out_shapes.values()}
        return channels.pop() if len(channels) == 1 else None


def check_image_batch(x: Tensor, who: str = "backbone") -> None:
    """Refuse anything but a (N, 3, H, W) floating tensor, naming its shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a Tensor of shape (N, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{who} expects input of shape (N, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"{who} expects a normalized floating tensor, got dtype {x.dtype} "
            f"(shape {tuple(x.shape)})"
        )
