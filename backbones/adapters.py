"""Adapters that let peers' detectors use our backbones."""

from collections import OrderedDict
from typing import Dict, Optional

from torch import Tensor, nn

from .base import Backbone
from .shape_spec import ShapeSpec


class TorchvisionBackbone(nn.Module):
    """Renames an FPN's outputs to what torchvision's detection heads read by default:
    ``p2..p5`` -> ``"0".."3"`` and the top level ``p6`` -> ``"pool"``. Exposes the
    ``out_channels`` int that torchvision's ``FasterRCNN`` / ``MaskRCNN`` require.

        fpn = FPN(resnet50(weights="torchvision/resnet50.imagenet1k_v2"))
        model = torchvision.models.detection.FasterRCNN(TorchvisionBackbone(fpn), num_classes=91)
    """

    def __init__(self, backbone: Backbone, names: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        if backbone.out_channels is None:
            raise ValueError("torchvision's detectors need one channel count for every output; "
                             f"this backbone gives {backbone.output_shape()}")
        if names is None:
            levels = list(backbone.output_shape())
            names = {name: str(i) for i, name in enumerate(levels[:4])}
            names.update({name: "pool" for name in levels[4:5]})
            if len(levels) > 5:
                raise ValueError(f"give `names` for {levels}: the default maps 5 levels")
        self.body = backbone
        self.names = dict(names)
        self.out_channels: int = backbone.out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return OrderedDict((self.names[k], v) for k, v in feats.items() if k in self.names)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        shapes = self.body.output_shape()
        return {self.names[k]: v for k, v in shapes.items() if k in self.names}
