"""Pretrained weights as data: ``WeightsSpec`` and the registry of named checkpoints.

Each named checkpoint is a frozen ``WeightsSpec``: where the file is, its sha256, how its
parameters are named, and the input normalization it was trained with.
"""

import re
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..base import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from .download import cache_file_name

SOURCES = ("torchvision", "detectron2", "timm")
# MSRA's Caffe2 weights: BGR input, mean subtracted, no division (std folded into conv1).
MSRA_MEAN_BGR = (103.530, 116.280, 123.675)
MSRA_STD_BGR = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class WeightsSpec:
    """One pretrained checkpoint, described as data.

    ``sha256`` is the full hash or the published prefix (torchvision's 8 hex digits, also in
    its file names), None where nothing is published. ``source`` is the project whose
    parameter names the file uses. ``pixel_mean``/``pixel_std`` are on a 0-255 scale, in
    ``input_format`` channel order. ``style`` says where the bottleneck stride sits ("pytorch":
    the 3x3, "caffe": the first 1x1). ``metrics`` holds published numbers, e.g.
    ``{"imagenet_acc@1": 80.858}``.
    """

    name: str
    arch: str
    url: str
    sha256: Optional[str]
    source: str
    input_format: str = "RGB"
    pixel_mean: Tuple[float, float, float] = IMAGENET_MEAN_RGB
    pixel_std: Tuple[float, float, float] = IMAGENET_STD_RGB
    style: str = "pytorch"
    num_classes: int = 1000
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"{self.name}: source must be one of {SOURCES}, got {self.source!r}")
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"{self.name}: input_format must be 'RGB' or 'BGR'")
        if self.style not in ("pytorch", "caffe"):
            raise ValueError(f"{self.name}: style must be 'pytorch' or 'caffe'")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError(f"{self.name}: pixel_mean and pixel_std need 3 values")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{8,64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 8 to 64 lowercase hex digits")
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        # a mappingproxy cannot be pickled: rebuild from plain values (DDP spawn, checkpoints)
        values = tuple(dict(self.metrics) if f.name == "metrics" else getattr(self, f.name)
                       for f in fields(self))
        return (type(self), values)

    @property
    def file_name(self) -> str:
        """The file's name in the download cache."""
        return cache_file_name(self.url)


# torchvision's ImageNet weights: (arch, tag, url, sha256 prefix, acc@1, acc@5). The URLs are
# those of torchvision 0.29.1's ``*_Weights`` enums; the 8 hex digits in each file name are
# the start of the file's sha256.
_TORCHVISION = (
    ("resnet18", "imagenet1k_v1", "resnet18-f37072fd.pth", "f37072fd", 69.758, 89.078),
    ("resnet34", "imagenet1k_v1", "resnet34-b627a593.pth", "b627a593", 73.314, 91.42),
    ("resnet50", "imagenet1k_v1", "resnet50-0676ba61.pth", "0676ba61", 76.13, 92.862),
    ("resnet50", "imagenet1k_v2", "resnet50-11ad3fa6.pth", "11ad3fa6", 80.858, 95.434),
    ("resnet101", "imagenet1k_v1", "resnet101-63fe2227.pth", "63fe2227", 77.374, 93.546),
    ("resnet101", "imagenet1k_v2", "resnet101-cd907fc2.pth", "cd907fc2", 81.886, 95.78),
    ("resnet152", "imagenet1k_v1", "resnet152-394f9c45.pth", "394f9c45", 78.312, 94.046),
    ("resnet152", "imagenet1k_v2", "resnet152-f82ba261.pth", "f82ba261", 82.284, 96.002),
    ("resnext50_32x4d", "imagenet1k_v1", "resnext50_32x4d-7cdf4587.pth", "7cdf4587",
     77.618, 93.698),
    ("resnext50_32x4d", "imagenet1k_v2", "resnext50_32x4d-1a0047aa.pth", "1a0047aa",
     81.198, 95.34),
    ("resnext101_32x8d", "imagenet1k_v1", "resnext101_32x8d-8ba56ff5.pth", "8ba56ff5",
     79.312, 94.526),
    ("resnext101_32x8d", "imagenet1k_v2", "resnext101_32x8d-110c445d.pth", "110c445d",
     82.834, 96.228),
    ("wide_resnet50_2", "imagenet1k_v1", "wide_resnet50_2-95faca4d.pth", "95faca4d",
     78.468, 94.086),
    ("wide_resnet50_2", "imagenet1k_v2", "wide_resnet50_2-9ba9bcbe.pth", "9ba9bcbe",
     81.602, 95.758),
)
_TORCHVISION_BASE = "https://download.pytorch.org/models/"

# detectron2's MSRA ImageNet weights (Caffe2 names, stride in the 1x1, affine-only norms).
# No hash is published for them.
_DETECTRON2 = (("R-50", "resnet50"), ("R-101", "resnet101"))
_DETECTRON2_BASE = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/"

# timm's checkpoints on the Hugging Face hub (torchvision-like names, ImageNet mean/std). The
# hub publishes no hash a download could be checked against here: none recorded.
_TIMM = (
    ("resnet50", ("a1_in1k", "a1h_in1k", "a2_in1k", "a3_in1k", "tv_in1k", "tv2_in1k")),
    # ResNet-D: deep stem and average-pool shortcuts (timm 1.0's resnet50d tags with ImageNet
    # mean/std; its ra4_e3600_r224_in1k uses mean/std 0.5 and is left out)
    ("resnet50d", ("ra2_in1k", "a1_in1k", "a2_in1k", "a3_in1k", "gluon_in1k")),
)
_TIMM_BASE = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"


def _build_registry() -> Dict[str, WeightsSpec]:
    specs: List[WeightsSpec] = []
    for arch, tag, file_name, sha, acc1, acc5 in _TORCHVISION:
        specs.append(WeightsSpec(
            name=f"torchvision/{arch}.{tag}", arch=arch, url=_TORCHVISION_BASE + file_name,
            sha256=sha, source="torchvision",
            metrics={"imagenet_acc@1": acc1, "imagenet_acc@5": acc5},
        ))
    for short, arch in _DETECTRON2:
        specs.append(WeightsSpec(
            name=f"detectron2/{short}", arch=arch, url=f"{_DETECTRON2_BASE}{short}.pkl",
            sha256=None, source="detectron2", input_format="BGR", pixel_mean=MSRA_MEAN_BGR,
            pixel_std=MSRA_STD_BGR, style="caffe",
        ))
    for arch, tags in _TIMM:
        for tag in tags:
            specs.append(WeightsSpec(
                name=f"timm/{arch}.{tag}", arch=arch, url=_TIMM_BASE.format(f"{arch}.{tag}"),
                sha256=None, source="timm",
            ))
    return {s.name: s for s in specs}


WEIGHTS: Mapping[str, WeightsSpec] = MappingProxyType(_build_registry())


def list_weights(arch: Optional[str] = None) -> List[str]:
    """Registered weight names, sorted; only those for ``arch`` when given."""
    return sorted(n for n, s in WEIGHTS.items() if arch is None or s.arch == arch)
