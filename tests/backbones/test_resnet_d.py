"""ResNet-D (deep stem, average-pool shortcuts): parity with timm's resnet50d, its weights
entries, loading a timm file, and folding over the new stem and shortcuts."""

import pytest
import torch
from bn_calibration import calibrate_bn
from safetensors.torch import save_file
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import backbones
from backbones.convert import convert_to_ours, detect_format
from backbones.stems import DeepStem

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def timm_resnet50d():
    """timm's resnet50d with random weights and calibrated BN statistics, in float64."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet50d", pretrained=False)
    x = torch.randn(4, 3, 96, 128)
    calibrate_bn(ref, x)
    return ref.double()


def test_layout_is_resnet_d():
    m = backbones.resnet50d()
    assert isinstance(m.stem, DeepStem)
    assert [m.stem.conv1.out_channels, m.stem.conv2.out_channels, m.stem.conv3.out_channels] \
        == [32, 32, 64]
    assert m.stem.conv1.stride == (2, 2) and m.stem.conv1.kernel_size == (3, 3)
    pool, conv, _ = m.res3[0].downsample
    assert isinstance(pool, nn.AvgPool2d) and pool.stride == 2 and conv.stride == (1, 1)
    assert isinstance(m.res2[0].downsample[0], nn.Identity)  # res2 does not downsample
    assert m.res3[1].downsample is None


def test_parity_with_timm_resnet50d(timm_resnet50d):
    """Converted random weights: the same logits and features (float64, so round-off of 50
    layers cannot hide or fake a difference)."""
    ref = timm_resnet50d
    sd = {k: v.float() for k, v in ref.state_dict().items()}
    assert detect_format(sd) == "timm"
    converted, fmt = convert_to_ours(sd)
    ours = backbones.resnet50d(num_classes=1000, out_features=["res2", "res5", "logits"])
    report = ours.load_state_dict(converted, strict=True)
    assert not report.missing_keys and not report.unexpected_keys
    ours = ours.double().eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        got = ours(x)
        want_logits = ref(x)
        want_res5 = ref.forward_features(x)
        want_res2 = ref.layer1(ref.maxpool(ref.act1(ref.bn1(ref.conv1(x)))))
    assert torch.isfinite(want_logits).all() and want_logits.std() > 0.1  # not a dead net
    assert (got["logits"] - want_logits).abs().max().item() < 1e-4
    assert (got["res5"] - want_res5).abs().max().item() < 1e-6 * want_res5.abs().max().item()
    assert (got["res2"] - want_res2).abs().max().item() < 1e-6 * want_res2.abs().max().item()
    # and the numbers do depend on the new parts: without the average pool they differ
    plain = backbones.resnet50(num_classes=1000, out_features=["logits"])
    assert plain.state_dict().keys() != ours.state_dict().keys()


def test_timm_file_loads_through_weights_api(timm_resnet50d, tmp_path):
    """A timm resnet50d checkpoint on disk: its format, architecture and normalization are
    read from the file, and the loaded model computes timm's logits."""
    path = tmp_path / "resnet50d.safetensors"
    save_file({k: v.float().contiguous() for k, v in timm_resnet50d.state_dict().items()},
              str(path))
    spec = backbones.resolve_weights(str(path))
    assert (spec.arch, spec.source, spec.input_format) == ("resnet50d", "timm", "RGB")
    model = backbones.resnet50d(weights=str(path), norm="FrozenBN", freeze_at=0,
                                num_classes=1000, out_features=["logits"])
    assert spec.pixel_mean == backbones.IMAGENET_MEAN_RGB
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        got = model.double()(x)["logits"]
        want = timm_resnet50d(x)
    assert (got - want).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="are for resnet50d"):
        backbones.resnet50(weights="timm/resnet50d.ra2_in1k")


def test_registered_timm_weights():
    names = backbones.list_weights("resnet50d")
    assert "timm/resnet50d.ra2_in1k" in names and "timm/resnet50d.a1_in1k" in names
    spec = backbones.WEIGHTS["timm/resnet50d.ra2_in1k"]
    assert spec.url == ("https://huggingface.co/timm/resnet50d.ra2_in1k/resolve/main/"
                        "model.safetensors")
    assert (spec.source, spec.style, spec.pixel_std) == ("timm", "pytorch",
                                                         backbones.IMAGENET_STD_RGB)


def test_folding_covers_deep_stem_and_avg_down():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    m = backbones.resnet50d(out_features=["res3"]).double()
    calibrate_bn(m, x)
    m = backbones.freeze_batchnorm(m)
    with torch.no_grad():
        want = m(x)["res3"]
        backbones.fold_frozen_batchnorm(m)
        got = m(x)["res3"]
    assert not any(isinstance(mod, FrozenBatchNorm2d) for mod in m.modules())
    assert (got - want).abs().max().item() < 1e-9 * want.abs().max().item()


def test_a_stem_module_of_ones_own():
    """ResNet takes a built stem: anything with out_channels and stride."""

    class PatchStem(nn.Module):
        out_channels, stride = 48, 4

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 48, 4, stride=4)

        def forward(self, x):
            return self.proj(x)

    m = backbones.ResNet(block="basic", layers=[1, 1, 1, 1], stem=PatchStem())
    out = m(torch.randn(1, 3, 64, 64))
    assert out["res2"].shape == (1, 64, 16, 16) and out["res5"].shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match="stride"):
        backbones.ResNet(block="basic", layers=[1, 1, 1, 1], stem=nn.Conv2d(3, 64, 4, 4))
    with pytest.raises(ValueError, match="unknown stem 'tiered'"):
        backbones.ResNet(block="basic", layers=[1, 1, 1, 1], stem="tiered")
