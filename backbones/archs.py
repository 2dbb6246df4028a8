"""The ResNet architectures by name, as data: blocks per stage, width, stem and shortcut.

``ARCHS`` is the one table a builder, a weights file's architecture guess and a config's
``MODEL.RESNETS.DEPTH`` read. Adding a plain variant is one entry here plus its builder line
in ``backbones.resnet``.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# Blocks per stage res2..res5 of each depth in Table 1 of the paper.
DEPTHS: Dict[int, Tuple[str, Tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


@dataclass(frozen=True)
class ResNetArch:
    """One ResNet variant.

    ``stem`` names an entry of ``backbones.stems.STEMS`` ("classic": 7x7 conv; "deep": three
    3x3 convs, ResNet-C/D). ``avg_down`` makes each downsampling shortcut an average pool
    followed by a stride-1 1x1 conv (ResNet-D) instead of a stride-2 1x1 conv.
    """

    depth: int
    groups: int = 1
    width_per_group: int = 64
    stem: str = "classic"
    avg_down: bool = False

    @property
    def block(self) -> str:
        return DEPTHS[self.depth][0]

    @property
    def layers(self) -> Tuple[int, int, int, int]:
        return DEPTHS[self.depth][1]


ARCHS: Dict[str, ResNetArch] = {
    "resnet18": ResNetArch(18),
    "resnet34": ResNetArch(34),
    "resnet50": ResNetArch(50),
    "resnet101": ResNetArch(101),
    "resnet152": ResNetArch(152),
    "resnext50_32x4d": ResNetArch(50, groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetArch(101, groups=32, width_per_group=8),
    "wide_resnet50_2": ResNetArch(50, width_per_group=128),
    "resnet50d": ResNetArch(50, stem="deep", avg_down=True),  # timm's ResNet-D
}


def arch_for_depth(depth: int, groups: int = 1, width_per_group: int = 64) -> Optional[str]:
    """The registered classic-stem ResNet of this depth, cardinality and width (50, 32, 4 ->
    "resnext50_32x4d"), or None when there is none. ValueError for a depth not in Table 1."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    wanted = ResNetArch(depth, groups=groups, width_per_group=width_per_group)
    return next((name for name, arch in ARCHS.items() if arch == wanted), None)
