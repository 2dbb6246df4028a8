"""ResNet family: parity with torchvision, options, freezing, folding and bad input."""

import pytest
import torch
import torchvision
from bn_calibration import calibrate_bn
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

import backbones
from backbones.convert import torchvision_resnet_to_ours

ARCHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2",
]
STAGES = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}


def _torchvision_pair(arch: str, x: torch.Tensor, **kwargs):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None, **kwargs)
    calibrate_bn(ref, x)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_torchvision(arch):
    x = torch.randn(2, 3, 64, 96)
    ref = _torchvision_pair(arch, x)
    ours = backbones.build_backbone(arch, num_classes=1000,
                                    out_features=["res2", "res3", "res4", "res5", "logits"])
    report = ours.load_state_dict(torchvision_resnet_to_ours(ref.state_dict()), strict=False)
    # our BN has the same buffers; nothing may be missing or left over
    assert not report.missing_keys and not report.unexpected_keys
    ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        got = ours(x)
        logits = ref(x)
        stages = IntermediateLayerGetter(ref, STAGES)(x)
    assert logits.abs().max() > 1e-2 and torch.isfinite(logits).all()
    assert (got["logits"] - logits).abs().max().item() <= 1e-4
    for name, feat in stages.items():
        assert got[name].shape == feat.shape
        torch.testing.assert_close(got[name], feat, rtol=1e-4, atol=1e-4)


def test_param_counts_equal_torchvision_and_facts():
    # FACTS.md: torchvision's parameter counts.
    expected = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
    for arch, n in expected.items():
        ours = backbones.build_backbone(arch, num_classes=1000)
        assert sum(p.numel() for p in ours.parameters()) == n


@pytest.mark.parametrize("dilate", [[False, False, True], [False, True, True]])
def test_dilation_torchvision_convention(dilate):
    x = torch.randn(1, 3, 64, 64)
    ref = _torchvision_pair("resnet50", x, replace_stride_with_dilation=dilate)
    dil = (1, 1, 2, 4) if dilate[1] else (1, 1, 1, 2)
    ours = backbones.resnet50(dilations=dil, dilation_mode="torchvision", num_classes=1000,
                              out_features=["res4", "res5", "logits"])
    ours.load_state_dict(torchvision_resnet_to_ours(ref.state_dict()))
    ours.eval()
    with torch.no_grad():
        got = ours(x)
        want = IntermediateLayerGetter(ref, {"layer3": "res4", "layer4": "res5"})(x)
        torch.testing.assert_close(got["logits"], ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["res5"], want["res5"], rtol=1e-4, atol=1e-4)
    stride = 8 if dilate[1] else 16
    assert ours.output_shape()["res5"].stride == stride
    assert got["res5"].shape[-1] == 64 // stride


def test_dilation_detectron2_convention_dilates_every_block():
    m = backbones.resnet50(dilations=(1, 1, 1, 2))  # DC5
    assert [b.conv2.dilation for b in m.res5] == [(2, 2)] * 3
    assert m.res5[0].downsample[0].stride == (1, 1)
    m_tv = backbones.resnet50(dilations=(1, 1, 1, 2), dilation_mode="torchvision")
    assert [b.conv2.dilation for b in m_tv.res5] == [(1, 1), (2, 2), (2, 2)]
    out = m(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape[-2:] == (4, 4)
    assert m.output_shape()["res5"].stride == 16


def test_caffe_style_puts_stride_in_first_1x1():
    m = backbones.resnet50(style="caffe", out_features=["res3"])
    assert m.res3[0].conv1.stride == (2, 2) and m.res3[0].conv2.stride == (1, 1)
    p = backbones.resnet50(out_features=["res3"])
    assert p.res3[0].conv1.stride == (1, 1) and p.res3[0].conv2.stride == (2, 2)


def test_deformable_stages_start_as_plain_convs():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    plain = backbones.resnet50(out_features=["res4"])
    deform = backbones.resnet50(out_features=["res4"], deform_stages=["res3", "res4"])
    sd = plain.state_dict()
    report = deform.load_state_dict(sd, strict=False)
    assert all(".conv2.offset." in k for k in report.missing_keys)
    assert len(report.missing_keys) == 2 * (4 + 6)  # weight+bias of each res3/res4 block
    plain.eval(), deform.eval()
    with torch.no_grad():  # zero offsets: deformable conv equals the plain conv
        torch.testing.assert_close(deform(x)["res4"], plain(x)["res4"], rtol=1e-4, atol=1e-4)
    # and the offsets do change the output once they are non-zero, and get gradients
    deform.train()
    out = deform(x)["res4"].sum()
    out.backward()
    assert deform.res3[0].conv2.offset.weight.grad.abs().sum() > 0
    mod = backbones.resnet50(out_features=["res3"], deform_stages=["res3"],
                             deform_modulated=True)
    assert mod.res3[0].conv2.offset.out_channels == 27


def test_out_features_limit_built_stages():
    m = backbones.resnet50(out_features=["res2", "res4"])
    assert not hasattr(m, "res5")
    assert list(m(torch.randn(1, 3, 32, 32))) == ["res2", "res4"]


def test_make_stage_alone_matches_res5():
    torch.manual_seed(0)
    full = backbones.resnet50()
    head = backbones.make_stage("bottleneck", 3, 1024, 512, stride=2, norm="BN")
    head.load_state_dict(full.res5.state_dict())
    x = torch.randn(2, 1024, 7, 7)
    full.eval(), head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(x), full.res5(x))


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freezing(freeze_at):
    torch.manual_seed(0)
    m = backbones.resnet18(norm="BN", freeze_at=freeze_at)
    m.train()
    parts = [m.stem, m.res2, m.res3, m.res4, m.res5]
    stats_before = [
        {k: v.clone() for k, v in p.state_dict().items() if "running" in k} for p in parts
    ]
    out = m(torch.randn(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    for i, part in enumerate(parts):
        frozen = i < freeze_at
        for name, p in part.named_parameters():
            assert (p.grad is None) == frozen, (i, name)
        norms = [mod for mod in part.modules() if isinstance(mod, (nn.BatchNorm2d,
                                                                    FrozenBatchNorm2d))]
        assert all(isinstance(n, FrozenBatchNorm2d) == frozen for n in norms)
        after = {k: v for k, v in part.state_dict().items() if "running" in k}
        for k, v in stats_before[i].items():
            assert torch.equal(after[k], v) == frozen, (i, k)


def test_defaults_without_weights_train_from_scratch():
    m = backbones.resnet50()
    assert m.freeze_at == 0
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert all(p.requires_grad for p in m.parameters())
    gn = backbones.resnet50(norm="GN")
    assert any(isinstance(x, nn.GroupNorm) for x in gn.modules())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fold_frozen_batchnorm_is_exact(dtype, tol):
    """Folding is exact algebra: float64 agrees to round-off; float32 differs only by the
    round-off that 50 layers accumulate (about 6e-5 relative at res5 with these statistics)."""
    x = torch.randn(2, 3, 96, 80)
    torch.manual_seed(0)
    m = backbones.resnet50(num_classes=10, out_features=["res3", "res5", "logits"])
    calibrate_bn(m, x)
    m = backbones.freeze_batchnorm(m).to(dtype)
    x = x.to(dtype)
    with torch.no_grad():
        want = m(x)
        folded = backbones.fold_frozen_batchnorm(m)
        assert not any(isinstance(mod, FrozenBatchNorm2d) for mod in folded.modules())
        got = folded(x)
    for k in want:
        rel = (got[k] - want[k]).norm() / want[k].norm()
        assert rel <= tol, (k, rel.item())
    assert (got["res3"] - want["res3"]).norm() / want["res3"].norm() <= max(tol, 1e-5)


def test_bad_input_shapes_are_named():
    m = backbones.resnet18()
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\)"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(KeyError) as err:
        backbones.build_backbone("resnet51")
    assert "resnet50" in str(err.value) and "wide_resnet50_2" in str(err.value)


def test_invalid_options():
    with pytest.raises(ValueError, match="style"):
        backbones.resnet50(style="tf")
    with pytest.raises(ValueError, match="norm"):
        backbones.resnet50(norm="LN")
    with pytest.raises(ValueError, match="out_features"):
        backbones.resnet50(out_features=["res6"])
    with pytest.raises(ValueError, match="bottleneck"):
        backbones.resnet18(deform_stages=["res3"])
