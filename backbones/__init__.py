"""ResNet backbones, FPN and pretrained-weight loading.

    from backbones import resnet50, FPN
    body = resnet50(weights="torchvision/resnet50.imagenet1k_v2")   # FrozenBN, freeze_at=2
    fpn = FPN(body, out_channels=256)                                # p2..p6

Layout: ``base`` (the Backbone contract), ``registry`` (backbones by name), ``archs`` (the
ResNet table), ``stems`` and ``blocks`` (ResNet parts), ``resnet`` (the model and its
builders), ``fpn``, ``norm``, ``inference`` (folding), ``fused`` (oneDNN post-ops) and
``winograd`` (its 3x3 convolutions), ``cpu_memory`` (glibc's heap for inference processes),
``convert`` (other projects' names), ``weights/`` (registry, download, reading, loading),
``adapters`` (torchvision) and ``integrations/`` (detectron2).
"""

from .archs import ARCHS, ResNetArch, arch_for_depth
from .base import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Backbone
from .blocks import BasicBlock, Bottleneck, make_stage
from .cpu_memory import retain_freed_memory
from .fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from .inference import fold_conv_norm, fold_frozen_batchnorm, prepare_for_inference
from .norm import freeze_batchnorm, get_norm
from .registry import build_backbone, get_backbone_builder, list_backbones, register_backbone
from .resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet50d,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    wide_resnet50_2,
)
from .shape_spec import ShapeSpec
from .stems import STEMS, ClassicStem, DeepStem
from .weights import (
    WEIGHTS,
    LoadReport,
    WeightsSpec,
    download_weights,
    list_weights,
    load_pretrained,
    read_checkpoint,
    resolve_weights,
)

__all__ = [
    "ARCHS",
    "Backbone",
    "BasicBlock",
    "Bottleneck",
    "ClassicStem",
    "DeepStem",
    "FPN",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "LoadReport",
    "ResNet",
    "ResNetArch",
    "STEMS",
    "ShapeSpec",
    "WEIGHTS",
    "WeightsSpec",
    "arch_for_depth",
    "build_backbone",
    "download_weights",
    "fold_conv_norm",
    "fold_frozen_batchnorm",
    "freeze_batchnorm",
    "get_backbone_builder",
    "get_norm",
    "list_backbones",
    "list_weights",
    "load_pretrained",
    "make_stage",
    "prepare_for_inference",
    "read_checkpoint",
    "register_backbone",
    "retain_freed_memory",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50d",
    "resnext101_32x8d",
    "resnext50_32x4d",
    "resolve_weights",
    "wide_resnet50_2",
]
