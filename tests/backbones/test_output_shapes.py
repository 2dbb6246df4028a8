"""Every registered backbone: declared output_shape() equals what forward() returns."""

import pytest
import torch

import backbones


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_declared_shapes_match_outputs(name):
    model = backbones.build_backbone(name)
    # the large variants at a small odd size keep this quick; strides are what matter
    size = (225, 317) if name in ("resnet18", "resnet34", "resnet50") else (97, 129)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)
    shapes = model.output_shape()
    assert list(out) == list(shapes) == ["res2", "res3", "res4", "res5"]
    for key, spec in shapes.items():
        assert out[key].shape[1] == spec.channels
        assert out[key].shape[-2] == -(-size[0] // spec.stride)
        assert out[key].shape[-1] == -(-size[1] // spec.stride)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fpn_declared_shapes(name):
    fpn = backbones.FPN(backbones.build_backbone(name), out_channels=128)
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 225, 317))
    for key, spec in fpn.output_shape().items():
        assert out[key].shape[1] == spec.channels
        assert out[key].shape[-2] == -(-225 // spec.stride)
        assert out[key].shape[-1] == -(-317 // spec.stride)
