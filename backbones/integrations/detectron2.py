"""Our ResNet and FPN as detectron2 backbones.

Importing this module registers two builders in detectron2's ``BACKBONE_REGISTRY`` when
detectron2 is importable, and does nothing otherwise (``AVAILABLE`` says which)::

    import backbones.integrations.detectron2 as detkit_d2   # registers the builders
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    detkit_d2.add_detkit_config(cfg)                          # MODEL.DETKIT.* keys
    cfg.merge_from_file("faster_rcnn_detkit_R_50_FPN.yaml")
    model = build_model(cfg)                                  # detectron2's GeneralizedRCNN

where the YAML names the builder and, optionally, any registered backbone and its weights::

    _BASE_: "Base-RCNN-FPN.yaml"           # detectron2's own
    MODEL:
      BACKBONE: {NAME: "build_detkit_resnet_fpn_backbone"}
      DETKIT: {BACKBONE: "resnet50d", WEIGHTS: "timm/resnet50d.ra2_in1k"}
      PIXEL_MEAN: [123.675, 116.28, 103.53]   # the weights' normalization, RGB
      PIXEL_STD: [58.395, 57.12, 57.375]
    INPUT: {FORMAT: "RGB"}

``MODEL.DETKIT.BACKBONE`` empty means the ResNet of ``MODEL.RESNETS.DEPTH`` / ``NUM_GROUPS`` /
``WIDTH_PER_GROUP``. The rest comes from detectron2's own keys: ``MODEL.RESNETS.NORM``,
``STRIDE_IN_1X1``, ``RES5_DILATION``, ``OUT_FEATURES`` (C4), ``MODEL.BACKBONE.FREEZE_AT``,
``MODEL.FPN.IN_FEATURES`` / ``OUT_CHANNELS`` / ``NORM``. Our parameter names differ from
detectron2's ResNet, so ImageNet weights come through ``MODEL.DETKIT.WEIGHTS`` (our loader:
a registered name, URL or path), not through ``MODEL.WEIGHTS``; a detectron2 checkpoint of a
model built with these builders loads through ``MODEL.WEIGHTS`` as usual.
"""

from typing import Dict, List, Optional

from torch import Tensor, nn

from ..archs import arch_for_depth
from ..base import Backbone
from ..fpn import FPN
from ..registry import build_backbone

try:
    from detectron2.config import CfgNode as _D2CfgNode
    from detectron2.layers import ShapeSpec as _D2ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY
    from detectron2.modeling import Backbone as _D2Backbone

    AVAILABLE = True
except ImportError:  # detectron2 is optional: without it this module only defines names
    AVAILABLE = False
    _D2Backbone = nn.Module  # type: ignore[assignment, misc]

__all__ = ["AVAILABLE", "DetectronBackbone", "add_detkit_config", "body_from_d2_cfg",
           "build_detkit_resnet_backbone", "build_detkit_resnet_fpn_backbone"]


class DetectronBackbone(_D2Backbone):  # type: ignore[misc, valid-type]
    """One of our backbones behind detectron2's ``Backbone`` interface: the same outputs,
    ``output_shape()`` as detectron2 ``ShapeSpec``s, and the backbone's size divisibility.
    Its parameters sit under ``body.`` (``body.bottom_up.res2.0.conv1.weight`` for FPN)."""

    def __init__(self, body: Backbone) -> None:
        super().__init__()
        self.body = body
        self._out_features = list(body.output_shape())

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """(N, 3, H, W) normalized images -> {name: (N, C, H / stride, W / stride)}."""
        return self.body(x)

    def output_shape(self) -> Dict[str, "_D2ShapeSpec"]:
        return {name: _D2ShapeSpec(channels=s.channels, stride=s.stride)
                for name, s in self.body.output_shape().items()}

    @property
    def size_divisibility(self) -> int:
        return int(getattr(self.body, "size_divisibility", 0) or 0)


def add_detkit_config(cfg: "_D2CfgNode") -> "_D2CfgNode":
    """Add ``MODEL.DETKIT.BACKBONE`` (a registered backbone name; empty: from
    ``MODEL.RESNETS.DEPTH``) and ``MODEL.DETKIT.WEIGHTS`` (ImageNet weights for our loader) to
    a detectron2 config, as detectron2's own projects add their keys. Returns ``cfg``."""
    cfg.MODEL.DETKIT = type(cfg)()
    cfg.MODEL.DETKIT.BACKBONE = ""
    cfg.MODEL.DETKIT.WEIGHTS = ""
    return cfg


def _norm(name: str) -> str:
    return name if name else "none"


def body_from_d2_cfg(cfg: "_D2CfgNode", out_features: List[str]) -> Backbone:
    """Our backbone from a detectron2 config's ``MODEL.RESNETS`` / ``MODEL.BACKBONE`` keys
    (and ``MODEL.DETKIT`` when added), with outputs ``out_features``."""
    r = cfg.MODEL.RESNETS
    detkit = cfg.MODEL.get("DETKIT")
    name: Optional[str] = detkit.BACKBONE if detkit is not None and detkit.BACKBONE else None
    options: Dict[str, object] = {}
    if name is None:
        name = arch_for_depth(r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP)
        if name is None:  # a cardinality/width without a registered name: override one
            name = f"resnet{r.DEPTH}"
            options.update(groups=r.NUM_GROUPS, width_per_group=r.WIDTH_PER_GROUP)
    weights = detkit.WEIGHTS if detkit is not None and detkit.WEIGHTS else None
    if any(r.DEFORM_ON_PER_STAGE):
        options.update(deform_stages=[f"res{i + 2}" for i, on in
                                      enumerate(r.DEFORM_ON_PER_STAGE) if on],
                       deform_modulated=r.DEFORM_MODULATED)
    if r.RES5_DILATION != 1:
        options.update(dilations=(1, 1, 1, r.RES5_DILATION))
    return build_backbone(
        name, weights=weights, norm=_norm(r.NORM), freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        style="caffe" if r.STRIDE_IN_1X1 else "pytorch", out_features=list(out_features),
        **options,
    )


def _check_input(input_shape: "_D2ShapeSpec") -> None:
    if input_shape.channels not in (None, 3):
        raise ValueError(f"our backbones take 3-channel images, detectron2 asks for "
                         f"{input_shape.channels} (len(MODEL.PIXEL_MEAN))")


def build_detkit_resnet_backbone(cfg: "_D2CfgNode", input_shape: "_D2ShapeSpec"
                                 ) -> DetectronBackbone:
    """Our ResNet with outputs ``MODEL.RESNETS.OUT_FEATURES`` (res4 for the C4 detector)."""
    _check_input(input_shape)
    return DetectronBackbone(body_from_d2_cfg(cfg, list(cfg.MODEL.RESNETS.OUT_FEATURES)))


def build_detkit_resnet_fpn_backbone(cfg: "_D2CfgNode", input_shape: "_D2ShapeSpec"
                                     ) -> DetectronBackbone:
    """Our ResNet-FPN over ``MODEL.FPN.IN_FEATURES`` with a max-pool P6, as detectron2's
    ``build_resnet_fpn_backbone``: outputs p2..p6."""
    _check_input(input_shape)
    if cfg.MODEL.FPN.FUSE_TYPE != "sum":
        raise ValueError(f"MODEL.FPN.FUSE_TYPE {cfg.MODEL.FPN.FUSE_TYPE!r}: our FPN sums")
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    body = body_from_d2_cfg(cfg, in_features)
    fpn = FPN(body, out_channels=cfg.MODEL.FPN.OUT_CHANNELS, in_features=in_features,
              norm=_norm(cfg.MODEL.FPN.NORM), top_block="maxpool")
    return DetectronBackbone(fpn)


if AVAILABLE:
    for _builder in (build_detkit_resnet_backbone, build_detkit_resnet_fpn_backbone):
        if _builder.__name__ not in BACKBONE_REGISTRY:
            BACKBONE_REGISTRY.register(_builder)
