"""ResNet backbones, FPN and pretrained-weight loading.

    from backbones import resnet50, FPN
    body = resnet50(weights="torchvision/resnet50.imagenet1k_v2")   # FrozenBN, freeze_at=2
    fpn = FPN(body, out_channels=256)                                # p2..p6
"""

from .base import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Backbone
from .fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from .norm import (
    fold_conv_norm,
    fold_frozen_batchnorm,
    freeze_batchnorm,
    get_norm,
    prepare_for_inference,
)
from .resnet import (
    ARCHS,
    BasicBlock,
    Bottleneck,
    ResNet,
    build_backbone,
    list_backbones,
    make_stage,
    register_backbone,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    wide_resnet50_2,
)
from .shape_spec import ShapeSpec
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
    "FPN",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "LoadReport",
    "ResNet",
    "ShapeSpec",
    "WEIGHTS",
    "WeightsSpec",
    "build_backbone",
    "download_weights",
    "fold_conv_norm",
    "fold_frozen_batchnorm",
    "freeze_batchnorm",
    "get_norm",
    "list_backbones",
    "list_weights",
    "load_pretrained",
    "make_stage",
    "prepare_for_inference",
    "read_checkpoint",
    "register_backbone",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext101_32x8d",
    "resnext50_32x4d",
    "resolve_weights",
    "wide_resnet50_2",
]
