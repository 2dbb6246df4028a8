"""FPN: parity with torchvision's FPN, top blocks, norms and declared shapes."""

import re

import pytest
import torch
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import backbones
from backbones.convert import torchvision_resnet_to_ours


def _convert_torchvision_fpn_backbone(sd):
    out = {}
    body = torchvision_resnet_to_ours(
        {k[len("body."):]: v for k, v in sd.items() if k.startswith("body.")}
    )
    out.update({"bottom_up." + k: v for k, v in body.items()})
    for k, v in sd.items():
        m = re.match(r"fpn\.(inner|layer)_blocks\.(\d)\.(?:0\.)?(weight|bias)$", k)
        if m:
            kind = "lateral_convs" if m.group(1) == "inner" else "output_convs"
            out[f"{kind}.{m.group(2)}.conv.{m.group(3)}"] = v
    return out


@pytest.mark.parametrize("size", [(225, 317), (96, 128)])
def test_parity_with_torchvision_fpn(size):
    torch.manual_seed(0)
    ref = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                              norm_layer=FrozenBatchNorm2d)
    for m in ref.modules():  # non-trivial frozen statistics
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
    ours = backbones.FPN(backbones.resnet18(norm="FrozenBN"), out_channels=256)
    ours.load_state_dict(_convert_torchvision_fpn_backbone(ref.state_dict()))
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    assert list(got) == ["p2", "p3", "p4", "p5", "p6"]
    for (name, g), w in zip(got.items(), want.values()):
        assert torch.isfinite(w).all() and w.abs().max() > 1e-3
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
    assert ours.out_channels == ref.out_channels == 256


@pytest.mark.parametrize("top_block,top_in,names", [
    ("maxpool", "c5", ["p2", "p3", "p4", "p5", "p6"]),
    ("p6p7", "c5", ["p2", "p3", "p4", "p5", "p6", "p7"]),
    ("p6p7", "p5", ["p2", "p3", "p4", "p5", "p6", "p7"]),
    (None, "c5", ["p2", "p3", "p4", "p5"]),
])
@pytest.mark.parametrize("norm", ["none", "GN", "BN"])
def test_declared_shapes_at_odd_sizes(top_block, top_in, names, norm):
    fpn = backbones.FPN(backbones.resnet18(), out_channels=64, norm=norm, top_block=top_block,
                        top_block_in=top_in)
    out = fpn(torch.randn(2, 3, 225, 317))
    assert list(out) == names == list(fpn.output_shape())
    for name, spec in fpn.output_shape().items():
        assert spec.channels == out[name].shape[1] == 64
        assert spec.stride == 2 ** int(name[1:])
        assert out[name].shape[-2] == -(-225 // spec.stride)  # ceil: every conv pads
    assert fpn.size_divisibility == 32


def test_p6p7_source():
    fpn = backbones.FPN(backbones.resnet18(), out_channels=32, top_block="p6p7",
                        top_block_in="c5")
    assert fpn.top_block.p6.in_channels == 512
    fpn5 = backbones.FPN(backbones.resnet18(), out_channels=32, top_block="p6p7",
                         top_block_in="p5")
    assert fpn5.top_block.p6.in_channels == 32


def test_in_features_subset_and_errors():
    fpn = backbones.FPN(backbones.resnet50(out_features=["res3", "res4", "res5"]),
                        out_channels=32, top_block=None)
    assert list(fpn.output_shape()) == ["p3", "p4", "p5"]
    with pytest.raises(ValueError, match="res2"):
        backbones.FPN(backbones.resnet50(out_features=["res3", "res4"]), in_features=["res2"])
    with pytest.raises(ValueError, match="doubling"):
        backbones.FPN(backbones.resnet50(out_features=["res2", "res4"]))


def test_prepare_for_inference_folds_fpn_norms_exactly():
    torch.manual_seed(0)
    fpn = backbones.FPN(backbones.resnet18(norm="BN"), out_channels=32, norm="BN")
    fpn.train()
    with torch.no_grad():  # give the BatchNorms real statistics
        for m in fpn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        fpn(torch.randn(2, 3, 96, 96))
    fpn.eval()
    x = torch.randn(1, 3, 100, 130, dtype=torch.float64)
    fpn.double()
    with torch.no_grad():
        want = fpn(x)
        fast = backbones.prepare_for_inference(fpn, channels_last=True, fuse=False)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
        got = fast(x.contiguous(memory_format=torch.channels_last))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9)
