"""Backbones named by config: every registered backbone (a user's own too) builds a detector
from YAML, its declared shapes match its outputs, and the older "resnet"/"resnet_fpn" names
map to registered ones in one place."""

import math
import textwrap
from pathlib import Path

import pytest
import torch

import backbones
from detection.config import load_config
from detection.modeling.build import build_detector_backbone, build_model, resolve_backbone

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHAPES = CONFIGS / "faster_rcnn_r18_fpn_shapes.yaml"


def _yaml(tmp_path: Path, body: str, base: Path = SHAPES) -> Path:
    path = tmp_path / "named_backbone.yaml"
    path.write_text(f'_BASE_: "{base}"\n' + textwrap.dedent(body))
    return path


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_yaml_naming_each_registered_backbone_builds_a_detector(name, tmp_path):
    cfg = load_config(_yaml(tmp_path, f"""
        MODEL:
          BACKBONE: {{NAME: "{name}", NECK: "fpn"}}
          FPN: {{OUT_CHANNELS: 32}}
        """))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    body = model.backbone.bottom_up
    assert type(body).__name__ == "ResNet" and body.stem is not None
    size = (64, 96)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = model.backbone(x)
        body_feats = body(x)
        out = model([torch.rand(3, *size) * 255])
    for module, got in ((model.backbone, feats), (body, body_feats)):
        shapes = module.output_shape()
        assert list(got) == list(shapes)
        for key, spec in shapes.items():
            assert got[key].shape[1:] == (spec.channels, math.ceil(size[0] / spec.stride),
                                          math.ceil(size[1] / spec.stride)), (name, key)
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    assert set(out[0]) >= {"boxes", "scores", "labels"}


def test_resnet50d_detector_from_its_config(tmp_path):
    """configs/faster_rcnn_r50d_fpn.yaml (weights left out: no network in tests) builds the
    ResNet-D detector, which trains a step and predicts."""
    cfg = load_config(CONFIGS / "faster_rcnn_r50d_fpn.yaml",
                      ["MODEL.BACKBONE.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
                       "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"])
    assert resolve_backbone(cfg) == ("resnet50d", "fpn", {})
    model = build_model(cfg)
    body = model.backbone.bottom_up
    assert isinstance(body.stem, backbones.DeepStem)
    assert isinstance(body.res3[0].downsample[0], torch.nn.AvgPool2d)
    model.train()
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = model([torch.rand(3, 64, 96) * 255], targets)
    sum(losses.values()).backward()
    assert body.res3[0].downsample[1].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 96) * 255])
    assert out[0]["boxes"].shape[1] == 4


USER_MODULE = '''
import torch
from torch import nn

import backbones
from backbones import Backbone, ShapeSpec


@backbones.register_backbone
def tiny_user_net(*, out_features=None, **unused) -> Backbone:
    return TinyUserNet()


class TinyUserNet(Backbone):
    """Four strided convs: c2..c5 at strides 4..32."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, stride=s, padding=1)
                                   for i, o, s in ((3, 16, 4), (16, 24, 2), (24, 32, 2),
                                                   (32, 40, 2)))
        self._out_shapes = {f"c{k}": ShapeSpec(c, 2 ** k) for k, c in
                            zip(range(2, 6), (16, 24, 32, 40))}
        self.size_divisibility = 32

    def forward(self, x):
        out = {}
        for name, conv in zip(self._out_shapes, self.convs):
            x = out[name] = torch.relu(conv(x))
        return out
'''


def test_users_own_backbone_named_from_yaml(tmp_path, monkeypatch):
    """A backbone registered in the user's own module, named from YAML with an FPN neck."""
    (tmp_path / "my_backbones.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("my_backbones")
    cfg = load_config(_yaml(tmp_path, """
        MODEL:
          BACKBONE: {NAME: "tiny_user_net", NECK: "fpn"}
          FPN: {IN_FEATURES: [], OUT_CHANNELS: 32}
        """))
    model = build_model(cfg).eval()
    assert type(model.backbone.bottom_up).__name__ == "TinyUserNet"
    assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64) * 255])
    assert set(out[0]) >= {"boxes", "scores", "labels"}
    # the C4 detector runs a ResNet's res5 as its box head: refused, naming the cause
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    with pytest.raises(ValueError, match="Res5ROIHeads.*TinyUserNet"):
        build_model(cfg)


@pytest.mark.parametrize("opts,want", [
    ([], ("resnet18", "fpn", {})),
    (["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.NUM_GROUPS", "32",
      "MODEL.RESNETS.WIDTH_PER_GROUP", "4"], ("resnext50_32x4d", "fpn", {})),
    (["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.WIDTH_PER_GROUP", "128"],
     ("wide_resnet50_2", "fpn", {})),
    (["MODEL.RESNETS.DEPTH", "101", "MODEL.RESNETS.NUM_GROUPS", "32",
      "MODEL.RESNETS.WIDTH_PER_GROUP", "4"],
     ("resnet101", "fpn", {"groups": 32, "width_per_group": 4})),
    (["MODEL.BACKBONE.NAME", "resnet", "MODEL.RESNETS.DEPTH", "101"], ("resnet101", "none", {})),
    (["MODEL.BACKBONE.NAME", "resnext101_32x8d"], ("resnext101_32x8d", "none", {})),
    (["MODEL.BACKBONE.NAME", "resnet50d", "MODEL.BACKBONE.NECK", "FPN"],
     ("resnet50d", "fpn", {})),
])
def test_names_resolve_in_one_place(opts, want):
    assert resolve_backbone(load_config(SHAPES, opts)) == want


def test_legacy_groups_without_a_registered_name_build():
    cfg = load_config(SHAPES, ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.NUM_GROUPS", "8",
                               "MODEL.RESNETS.WIDTH_PER_GROUP", "4",
                               "MODEL.FPN.IN_FEATURES", "['res2', 'res3']"])
    body = build_detector_backbone(cfg).bottom_up
    assert body.res2[0].conv2.groups == 8 and body.res2[0].conv2.out_channels == 32  # 8 x 4


@pytest.mark.parametrize("opts,match", [
    (["MODEL.BACKBONE.NAME", "resnet5O"], r"unknown MODEL.BACKBONE.NAME 'resnet5O'.*resnet50"),
    (["MODEL.BACKBONE.NECK", "none"], r"'resnet_fpn' implies MODEL.BACKBONE.NECK 'fpn'"),
    (["MODEL.BACKBONE.NAME", "resnet50", "MODEL.BACKBONE.NECK", "bifpn"],
     r"MODEL.BACKBONE.NECK must be one of fpn, none"),
    (["MODEL.RESNETS.DEPTH", "77"], r"MODEL.RESNETS.DEPTH: .*77"),
    (["MODEL.BACKBONE.NAME", "resnet50d", "MODEL.BACKBONE.WEIGHTS",
      "torchvision/resnet50.imagenet1k_v2"], r"are for resnet50, but the model is resnet50d"),
])
def test_bad_backbone_config_names_the_key(opts, match):
    with pytest.raises(ValueError, match=match):
        build_detector_backbone(load_config(SHAPES, opts))
