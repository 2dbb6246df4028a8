import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from backbones.convert import (
    caffe2_resnet_to_ours,
    convert_to_ours,
    detect_format,
    detectron2_resnet_to_ours,
    timm_resnet_to_ours,
    to_tensors,
    torchvision_resnet_to_ours,
)
from backbones.resnet import ResNet


def _ours(arch_layers=(1, 1, 1, 1), block="bottleneck", **kwargs):
    return ResNet(block=block, layers=arch_layers, num_classes=10, **kwargs)


def _non_counter_keys(state_dict):
    return {k for k in state_dict if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("c2,ours", [
    ("conv1_w", "stem.conv1.weight"),
    ("res_conv1_bn_s", "stem.bn1.weight"),
    ("res_conv1_bn_b", "stem.bn1.bias"),
    ("res2_0_branch1_w", "res2.0.downsample.0.weight"),
    ("res2_0_branch1_bn_s", "res2.0.downsample.1.weight"),
    ("res2_0_branch1_bn_b", "res2.0.downsample.1.bias"),
    ("res2_0_branch2a_w", "res2.0.conv1.weight"),
    ("res2_0_branch2a_bn_s", "res2.0.bn1.weight"),
    ("res3_3_branch2b_w", "res3.3.conv2.weight"),
    ("res4_22_branch2c_bn_b", "res4.22.bn3.bias"),
    ("res5_2_branch2c_bn_rm", "res5.2.bn3.running_mean"),
    ("res5_2_branch2c_bn_riv", "res5.2.bn3.running_var"),
    ("pred_w", "fc.weight"),
    ("pred_b", "fc.bias"),
    ("fc1000_w", "fc.weight"),
])
def test_caffe2_names(c2, ours):
    out = caffe2_resnet_to_ours({c2: torch.ones(2)})
    assert ours in out


def test_caffe2_drops_momentum_and_fills_statistics():
    blobs = {
        "res_conv1_bn_s": torch.rand(4) + 0.5, "res_conv1_bn_b": torch.rand(4),
        "conv1_w": torch.rand(4, 3, 7, 7), "conv1_w_momentum": torch.zeros(4, 3, 7, 7),
        "res2_0_branch1_bn_s": torch.rand(8), "res2_0_branch1_bn_b": torch.rand(8),
    }
    out = caffe2_resnet_to_ours(blobs)
    assert not any("momentum" in k for k in out)
    for norm in ("stem.bn1", "res2.0.downsample.1"):
        assert torch.equal(out[f"{norm}.running_mean"], torch.zeros_like(out[f"{norm}.weight"]))
    # running_var = 1 - eps makes FrozenBatchNorm2d exactly the file's affine map s * x + b
    frozen = FrozenBatchNorm2d(4, eps=1e-5)
    frozen.load_state_dict({k[len("stem.bn1."):]: v for k, v in out.items()
                            if k.startswith("stem.bn1.")})
    x = torch.randn(2, 4, 3, 3)
    expected = x * blobs["res_conv1_bn_s"].view(1, -1, 1, 1) + blobs["res_conv1_bn_b"].view(
        1, -1, 1, 1)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-6, atol=1e-6)


def test_caffe2_keeps_given_statistics_and_unknown_names():
    out = caffe2_resnet_to_ours({
        "res_conv1_bn_s": torch.ones(2), "res_conv1_bn_rm": torch.full((2,), 3.0),
        "mystery_blob": torch.zeros(1),
    })
    assert torch.equal(out["stem.bn1.running_mean"], torch.full((2,), 3.0))
    assert "mystery_blob" in out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torchvision_names_cover_ours_exactly(arch):
    from backbones.resnet import ARCHS

    a = ARCHS[arch]
    ours = ResNet(block=a.block, layers=a.layers, groups=a.groups,
                  width_per_group=a.width_per_group, num_classes=1000).state_dict()
    theirs = getattr(torchvision.models, arch)().state_dict()
    converted = torchvision_resnet_to_ours(theirs)
    assert _non_counter_keys(converted) == _non_counter_keys(ours)
    for key, value in converted.items():
        assert value.shape == ours[key].shape, key


def test_timm_plain_names_map_like_torchvision():
    theirs = torchvision.models.resnet18().state_dict()
    assert timm_resnet_to_ours(theirs).keys() == torchvision_resnet_to_ours(theirs).keys()


@pytest.mark.parametrize("key,what", [
    ("conv1.8.weight", "stem other than the deep stem"),
    ("layer1.0.se.fc1.weight", "squeeze-excitation"),
])
def test_timm_variants_we_lack_are_refused(key, what):
    with pytest.raises(ValueError, match=what):
        timm_resnet_to_ours({"fc.weight": torch.zeros(1), key: torch.zeros(1)})


def test_detectron2_names():
    out = detectron2_resnet_to_ours({
        "stem.conv1.weight": 1, "stem.conv1.norm.weight": 2, "res2.0.conv1.norm.bias": 3,
        "res2.0.shortcut.weight": 4, "res2.0.shortcut.norm.running_var": 5,
        "res5.0.conv2_offset.weight": 6, "linear.weight": 7,
    })
    assert out == {
        "stem.conv1.weight": 1, "stem.bn1.weight": 2, "res2.0.bn1.bias": 3,
        "res2.0.downsample.0.weight": 4, "res2.0.downsample.1.running_var": 5,
        "res5.0.conv2.offset.weight": 6, "fc.weight": 7,
    }


def test_detect_format():
    tv = torchvision.models.resnet18().state_dict()
    assert detect_format(tv) == "torchvision"
    assert detect_format(["conv1_w", "res_conv1_bn_s", "res2_0_branch2a_w"]) == "caffe2"
    assert detect_format(["stem.conv1.weight", "stem.conv1.norm.weight"]) == "detectron2"
    assert detect_format(_ours().state_dict()) == "ours"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_format(["encoder.weight", "decoder.bias"])


def test_convert_to_ours_auto_and_explicit():
    tv = torchvision.models.resnet18().state_dict()
    out, fmt = convert_to_ours(tv)
    assert fmt == "torchvision" and "res2.0.conv1.weight" in out
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        convert_to_ours(tv, "caffe")


def test_to_tensors_from_numpy():
    out = to_tensors({
        "a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5),
        "c": torch.ones(1), "name": "not an array",
    })
    assert set(out) == {"a", "b", "c"}
    assert out["a"].dtype == torch.float32 and out["a"].shape == (2, 3)
    assert out["b"].item() == 2.5
