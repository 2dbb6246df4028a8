"""The ResNet family (He et al., CVPR 2016) with ResNeXt, Wide ResNet and ResNet-D variants.

Parameter names (what converters map to):

    stem.*                                    see ``backbones.stems`` (classic: conv1 / bn1)
    res{2..5}.{i}.*                           see ``backbones.blocks`` (conv1 / bn1, ...)
    fc                                        classification head (only with num_classes > 0)

Stage ``res{k}`` has stride ``2**k`` (4, 8, 16, 32) unless dilated. The architectures by name
are in ``backbones.archs.ARCHS``; each has a builder here, registered for
``build_backbone(name)``.
"""

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .archs import ARCHS, ResNetArch
from .base import Backbone, check_image_batch
from .blocks import BLOCKS, BasicBlock, Bottleneck, DeformConv2d, make_stage
from .norm import freeze_batchnorm
from .registry import build_backbone, list_backbones, register_backbone
from .shape_spec import ShapeSpec
from .stems import Stem, build_stem
from .weights import load_pretrained, resolve_weights

__all__ = [
    "ARCHS", "BasicBlock", "Bottleneck", "ResNet", "ResNetArch", "Stem", "build_backbone",
    "list_backbones", "make_stage", "register_backbone", "resnet18", "resnet34", "resnet50",
    "resnet50d", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "wide_resnet50_2",
]

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class ResNet(Backbone):
    """A ResNet as a backbone: ``forward(x)`` returns ``{name: feature}`` for ``out_features``.

    Args:
        block: "basic" or "bottleneck".
        layers: blocks per stage, res2..res5 (e.g. [3, 4, 6, 3] for ResNet-50).
        norm: "BN", "FrozenBN", "SyncBN" or "GN".
        freeze_at: 0 freezes nothing, 1 the stem, k the stem and res2..res{k}.
        style: "pytorch" (stride in the 3x3) or "caffe" (stride in the first 1x1).
        stem: a name in ``backbones.stems.STEMS`` ("classic" 7x7, "deep" three 3x3s) or a
            built module with ``out_channels`` and ``stride`` attributes.
        stem_channels: output channels of a named stem.
        avg_down: downsampling shortcuts average-pool before a stride-1 1x1 conv (ResNet-D).
        dilations: dilation of res2..res5 (1 or 2 for res4/res5). A dilated stage keeps
            stride 1. Output stride 16 is ``(1, 1, 1, 2)`` (DC5), 8 is ``(1, 1, 2, 4)``.
        dilation_mode: "detectron2" dilates every block of a dilated stage; "torchvision" gives
            a stage's first block the previous stage's dilation (``replace_stride_with_dilation``).
        deform_stages: stage names whose 3x3 convs are deformable (bottlenecks only).
        out_features: outputs, among res2..res5 and "logits". Stages after the last requested
            one are not built. Default: res2..res5, or ["logits"] with a classifier head.
        num_classes: > 0 adds global average pooling and a linear classifier (``fc``).
    """

    def __init__(
        self, *, block: str, layers: Sequence[int], norm: str = "BN", freeze_at: int = 0,
        style: str = "pytorch", groups: int = 1, width_per_group: int = 64,
        stem: Union[str, nn.Module] = "classic", stem_channels: int = 64,
        avg_down: bool = False, dilations: Sequence[int] = (1, 1, 1, 1),
        dilation_mode: str = "detectron2", deform_stages: Sequence[str] = (),
        deform_modulated: bool = False, out_features: Optional[Sequence[str]] = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {style!r}")
        if dilation_mode not in ("detectron2", "torchvision"):
            raise ValueError(
                f"dilation_mode must be 'detectron2' or 'torchvision', got {dilation_mode!r}"
            )
        if len(layers) != 4 or len(dilations) != 4:
            raise ValueError("layers and dilations need one entry per stage res2..res5")
        if out_features is None:
            out_features = ["logits"] if num_classes > 0 else list(STAGE_NAMES)
        valid = set(STAGE_NAMES) | ({"logits"} if num_classes > 0 else set())
        bad = [f for f in out_features if f not in valid]
        if bad or not out_features:
            raise ValueError(f"unknown out_features {bad}; valid: {sorted(valid)}")
        for name in deform_stages:
            if name not in STAGE_NAMES:
                raise ValueError(f"unknown deform stage {name!r}; valid: {STAGE_NAMES}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")

        self.block, self.layers, self.norm = block, tuple(layers), norm
        self.style, self.freeze_at, self.num_classes = style, freeze_at, num_classes
        self.stem = build_stem(stem, 3, stem_channels, norm) if isinstance(stem, str) else stem
        for attr in ("out_channels", "stride"):
            if not isinstance(getattr(self.stem, attr, None), int):
                raise ValueError(f"a stem module needs an int {attr!r} attribute, "
                                 f"{type(self.stem).__name__} has none")
        last_needed = 4 if "logits" in out_features else max(
            STAGE_NAMES.index(f) for f in out_features if f != "logits"
        )
        expansion = BLOCKS[block].expansion
        in_channels, stride, prev_dilation = self.stem.out_channels, self.stem.stride, 1
        shapes: Dict[str, ShapeSpec] = {}
        self.stage_names: List[str] = []
        for i, name in enumerate(STAGE_NAMES[: last_needed + 1]):
            planes = 64 * 2**i
            dilation = dilations[i]
            stage_stride = 1 if i == 0 or dilation > 1 else 2
            first = prev_dilation if dilation_mode == "torchvision" else dilation
            stage = make_stage(
                block, layers[i], in_channels, planes, stride=stage_stride, dilation=dilation,
                first_dilation=first, norm=norm, groups=groups, width_per_group=width_per_group,
                stride_in_1x1=style == "caffe", deform=name in deform_stages,
                deform_modulated=deform_modulated, avg_down=avg_down,
            )
            self.add_module(name, stage)
            self.stage_names.append(name)
            in_channels = planes * expansion
            stride *= stage_stride
            prev_dilation = dilation
            shapes[name] = ShapeSpec(channels=in_channels, stride=stride)
        if num_classes > 0:
            self.fc = nn.Linear(in_channels, num_classes)
            shapes["logits"] = ShapeSpec(channels=num_classes, stride=None)
        self._out_shapes = {f: shapes[f] for f in out_features}
        self._stage_shapes = shapes  # every stage's, for pop_last_stage
        self._init_weights()
        self.freeze(freeze_at)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, DeformConv2d):  # offsets start at zero: a plain conv at first
                nn.init.zeros_(m.offset.weight)
                nn.init.zeros_(m.offset.bias)

    def freeze(self, freeze_at: int) -> "ResNet":
        """Freeze the stem (freeze_at >= 1) and res2..res{freeze_at}: no gradients, and their
        BatchNorms become FrozenBatchNorm2d with the same statistics."""
        parts = [self.stem] + [getattr(self, n) for n in self.stage_names]
        for part in parts[:freeze_at]:
            for p in part.parameters():
                p.requires_grad_(False)
            freeze_batchnorm(part)
        self.freeze_at = freeze_at
        return self

    def pop_last_stage(self) -> nn.Sequential:
        """Remove the last stage and return it (with its weights); the ResNet then ends at the
        stage before, which becomes its only output. The C4 detector runs res5 this way, as
        its box head."""
        if len(self.stage_names) < 2 or self.num_classes > 0:
            raise ValueError("pop_last_stage needs two stages or more and no classifier head")
        name = self.stage_names.pop()
        stage = getattr(self, name)
        delattr(self, name)
        previous = self.stage_names[-1]
        self._out_shapes = {previous: self._stage_shapes[previous]}
        return stage

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        check_image_batch(x, type(self).__name__)
        outputs: Dict[str, Tensor] = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_shapes:
                outputs[name] = x
        if self.num_classes > 0 and "logits" in self._out_shapes:
            outputs["logits"] = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return {k: outputs[k] for k in self._out_shapes}

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet-style logits ``(N, num_classes)``."""
        if self.num_classes <= 0:
            raise RuntimeError("this ResNet was built without a classification head "
                               "(num_classes=0)")
        feats = self.forward(x)
        if "logits" not in feats:
            raise RuntimeError("'logits' is not among out_features")
        return feats["logits"]


def _build(
    arch: str, *, weights: Optional[str] = None, norm: Optional[str] = None,
    freeze_at: Optional[int] = None, style: Optional[str] = None, progress: bool = True,
    **kwargs,
) -> ResNet:
    """Build ``arch``; with ``weights`` (a registered name, URL or path) load them.

    Defaults follow the weights: pretrained gives FrozenBN and freeze_at 2, and the
    stride placement the weights were trained with; no weights gives BN, nothing frozen.
    The architecture's groups, width, stem and shortcut can be overridden by keyword.
    """
    a: ResNetArch = ARCHS[arch]
    spec = resolve_weights(weights, arch=arch) if weights is not None else None
    if norm is None:
        norm = "FrozenBN" if weights is not None else "BN"
    if freeze_at is None:
        freeze_at = 2 if weights is not None else 0
    if style is None:
        style = spec.style if spec is not None else "pytorch"
    if weights is not None and kwargs.get("num_classes", 0) and spec is not None:
        if spec.num_classes and kwargs["num_classes"] != spec.num_classes:
            raise ValueError(
                f"weights {spec.name!r} have {spec.num_classes} classes, "
                f"num_classes={kwargs['num_classes']} was asked for"
            )
    options = dict(groups=a.groups, width_per_group=a.width_per_group, stem=a.stem,
                   avg_down=a.avg_down)
    options.update(kwargs)
    model = ResNet(block=a.block, layers=a.layers, norm=norm, freeze_at=0, style=style,
                   **options)
    if weights is not None:
        load_pretrained(model, weights, spec=spec, progress=progress)
    model.freeze(freeze_at)
    return model


def _make_builder(arch: str) -> Callable[..., ResNet]:
    def builder(
        *, weights: Optional[str] = None, norm: Optional[str] = None,
        freeze_at: Optional[int] = None, style: Optional[str] = None, **kwargs,
    ) -> ResNet:
        return _build(arch, weights=weights, norm=norm, freeze_at=freeze_at, style=style,
                      **kwargs)

    a = ARCHS[arch]
    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = (
        f"{arch}: {a.block} blocks {list(a.layers)}, groups {a.groups}, width/group "
        f"{a.width_per_group}, {a.stem} stem{', average-pool shortcuts' if a.avg_down else ''}."
        " Keyword options as in ``ResNet``; ``weights`` is a registered name (see "
        "``list_weights()``), a URL or a local path."
    )
    return register_backbone(builder)


resnet18 = _make_builder("resnet18")
resnet34 = _make_builder("resnet34")
resnet50 = _make_builder("resnet50")
resnet101 = _make_builder("resnet101")
resnet152 = _make_builder("resnet152")
resnext50_32x4d = _make_builder("resnext50_32x4d")
resnext101_32x8d = _make_builder("resnext101_32x8d")
wide_resnet50_2 = _make_builder("wide_resnet50_2")
resnet50d = _make_builder("resnet50d")
