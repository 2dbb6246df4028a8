"""The declared shape of one feature map a backbone produces."""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (input pixels per feature pixel) of a feature map."""

    channels: Optional[int] = None
    stride: Optional[int] = None
