"""The ResNet family (He et al., CVPR 2016) with ResNeXt and Wide ResNet variants.

Parameter names (what converters map to):

    stem.conv1, stem.bn1                      7x7/2 conv and its norm (then ReLU, 3x3/2 max-pool)
    res{2..5}.{i}.conv1 / bn1, conv2 / bn2    block convs and norms (conv3 / bn3 for bottlenecks)
    res{2..5}.{i}.conv2.offset                offset (and mask) conv of a deformable block
    res{2..5}.{i}.downsample.0 / .1           projection shortcut conv and norm
    fc                                        classification head (only with num_classes > 0)

Stage ``res{k}`` has stride ``2**k`` (4, 8, 16, 32) unless dilated.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from .base import Backbone, check_image_batch
from .norm import freeze_batchnorm, get_norm
from .shape_spec import ShapeSpec

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class DeformConv2d(nn.Module):
    """A 3x3 deformable convolution (DCNv1, or DCNv2 when ``modulated``) whose offsets (and
    mask) come from a zero-initialised conv (detectron2 names it ``conv2_offset``)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int, dilation: int, groups: int,
        deform_groups: int = 1, modulated: bool = False,
    ) -> None:
        super().__init__()
        self.stride, self.dilation, self.padding = stride, dilation, dilation
        self.modulated, self.deform_groups = modulated, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.register_parameter("bias", None)
        offset_channels = deform_groups * (27 if modulated else 18)
        self.offset = nn.Conv2d(
            in_channels, offset_channels, 3, stride=stride, padding=dilation, dilation=dilation
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.offset(x)
        mask = None
        if self.modulated:
            n = 18 * self.deform_groups
            out, mask = out[:, :n], out[:, n:].sigmoid()
        return deform_conv2d(
            x, out, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
        norm: str = "BN", groups: int = 1, width_per_group: int = 64,
        stride_in_1x1: bool = False, deform: bool = False, deform_modulated: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        if deform:
            raise ValueError("deformable convolution is supported in bottleneck blocks only")
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = get_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = get_norm(norm, planes)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, optionally deformable), 1x1 expand.

    ``stride_in_1x1`` puts the stride in the first 1x1 conv (the paper's and MSRA's layout,
    "caffe" style); otherwise it sits in the 3x3 conv (torchvision's, "pytorch" style).
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
        norm: str = "BN", groups: int = 1, width_per_group: int = 64,
        stride_in_1x1: bool = False, deform: bool = False, deform_modulated: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        s1x1, s3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=s1x1, bias=False)
        self.bn1 = get_norm(norm, width)
        if deform:
            self.conv2 = DeformConv2d(width, width, stride=s3x3, dilation=dilation,
                                      groups=groups, modulated=deform_modulated)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=s3x3, padding=dilation,
                                   dilation=dilation, groups=groups, bias=False)
        self.bn2 = get_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = get_norm(norm, out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> Optional[nn.Module]:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        get_norm(norm, out_channels),
    )


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(
    block: Union[str, type], num_blocks: int, in_channels: int, planes: int, *,
    stride: int = 2, dilation: int = 1, first_dilation: Optional[int] = None, norm: str = "BN",
    groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False,
    deform: bool = False, deform_modulated: bool = False,
) -> nn.Sequential:
    """One ResNet stage: ``num_blocks`` blocks, the first with ``stride``.

    ``first_dilation`` is the first block's dilation (torchvision keeps the previous stage's
    there; detectron2 uses ``dilation`` for every block, the default). Used by ``ResNet`` and
    on its own by the C4 detector, whose box head is res5.
    """
    block_cls = BLOCKS[block] if isinstance(block, str) else block
    blocks = []
    for i in range(num_blocks):
        d = first_dilation if (i == 0 and first_dilation is not None) else dilation
        blocks.append(block_cls(
            in_channels, planes, stride=stride if i == 0 else 1, dilation=d, norm=norm,
            groups=groups, width_per_group=width_per_group, stride_in_1x1=stride_in_1x1,
            deform=deform, deform_modulated=deform_modulated,
        ))
        in_channels = planes * block_cls.expansion
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max-pool: stride 4 in all."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNet(Backbone):
    """A ResNet as a backbone: ``forward(x)`` returns ``{name: feature}`` for ``out_features``.

    Args:
        block: "basic" or "bottleneck".
        layers: blocks per stage, res2..res5 (e.g. [3, 4, 6, 3] for ResNet-50).
        norm: "BN", "FrozenBN", "SyncBN" or "GN".
        freeze_at: 0 freezes nothing, 1 the stem, k the stem and res2..res{k}.
        style: "pytorch" (stride in the 3x3) or "caffe" (stride in the first 1x1).
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
        stem_channels: int = 64, dilations: Sequence[int] = (1, 1, 1, 1),
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
        self.stem = Stem(3, stem_channels, norm)
        last_needed = 4 if "logits" in out_features else max(
            STAGE_NAMES.index(f) for f in out_features if f != "logits"
        )
        expansion = BLOCKS[block].expansion
        in_channels, stride, prev_dilation = stem_channels, 4, 1
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
                deform_modulated=deform_modulated,
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


# --------------------------------------------------------------------------- registry

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _BUILDERS[fn.__name__] = fn
    return fn


def list_backbones() -> List[str]:
    return sorted(_BUILDERS)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone by name; the error lists the valid names."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown backbone {name!r}; valid backbones: {', '.join(list_backbones())}")
    return _BUILDERS[name](**kwargs)


# Table 1 of the paper plus the torchvision variants: (block, layers, groups, width_per_group)
ARCHS: Dict[str, Tuple[str, Tuple[int, int, int, int], int, int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
}


def _build(
    arch: str, *, weights: Optional[str] = None, norm: Optional[str] = None,
    freeze_at: Optional[int] = None, style: Optional[str] = None, progress: bool = True,
    **kwargs,
) -> ResNet:
    """Build ``arch``; with ``weights`` (a registered name, URL or path) load them.

    Defaults follow the weights: pretrained gives FrozenBN and freeze_at 2, and the
    stride placement the weights were trained with; no weights gives BN, nothing frozen.
    """
    block, layers, groups, width = ARCHS[arch]
    spec = None
    if weights is not None:
        from .weights import resolve_weights

        spec = resolve_weights(weights, arch=arch)
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
    model = ResNet(block=block, layers=layers, groups=groups, width_per_group=width,
                   norm=norm, freeze_at=0, style=style, **kwargs)
    if weights is not None:
        from .weights import load_pretrained

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

    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = (
        f"{arch}: {ARCHS[arch][0]} blocks {list(ARCHS[arch][1])}, groups {ARCHS[arch][2]}, "
        f"width/group {ARCHS[arch][3]}. Keyword options as in ``ResNet``; ``weights`` is a "
        "registered name (see ``list_weights()``), a URL or a local path."
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
