"""Fused inference layers (oneDNN post-ops) compute the same function as the folded model."""

import copy

import pytest
import torch
from torch import nn

import backbones
from backbones.fused import FusedBlock, FusedConv2d, FusedLinear, fuse_conv_relu

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="oneDNN is not available in this torch build")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d"])
def test_fused_backbone_equals_folded(arch):
    torch.manual_seed(0)
    model = backbones.FPN(backbones.build_backbone(arch, norm="FrozenBN"), out_channels=64)
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.1, 0.1)
    folded = backbones.prepare_for_inference(model, fuse=False)
    fused = fuse_conv_relu(copy.deepcopy(folded))
    kinds = {type(m) for m in fused.modules()}
    assert FusedBlock in kinds
    stem = fused.bottom_up.stem  # every stem conv carries its ReLU, whatever the stem
    pairs = type(stem).conv_norm_pairs
    assert all(isinstance(getattr(stem, c), FusedConv2d) for c, _ in pairs)
    assert all(isinstance(getattr(stem, n), nn.Identity) for _, n in pairs)
    assert not any(isinstance(m, (backbones.BasicBlock, backbones.Bottleneck))
                   for m in fused.modules())
    # FPN's lateral convs take the top-down map as an add post-op
    assert all(isinstance(c.conv, FusedConv2d) and not c.conv.relu for c in fused.lateral_convs)
    assert fused.state_dict().keys() != folded.state_dict().keys()  # really swapped
    x = torch.randn(2, 3, 97, 131).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = folded(x), fused(x)
    for k in want:
        rel = ((got[k] - want[k]).norm() / want[k].norm()).item()
        assert rel < 1e-5, (k, rel)
    # the same layers on a path oneDNN does not take (float64) give the same function too
    with torch.no_grad():
        got64 = fused.double()(x.double())
    for k in want:
        assert ((got64[k] - want[k].double()).norm() / want[k].norm()).item() < 1e-5


def test_fused_conv_add_relu_and_linear():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 21, 17)
    other = torch.randn(2, 32, 11, 9)
    with torch.no_grad():
        fused = FusedConv2d(conv, relu=True)
        torch.testing.assert_close(fused(x, other), torch.relu(conv(x) + other), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(FusedConv2d(conv, relu=False)(x), conv(x), rtol=1e-5,
                                   atol=1e-5)
        lin = nn.Linear(300, 40)
        y = torch.randn(7, 300)
        torch.testing.assert_close(FusedLinear(lin, relu=True)(y), torch.relu(lin(y)),
                                   rtol=1e-5, atol=1e-5)
    # with autograd recording, the plain ops run, so gradients still flow to the input
    x.requires_grad_(True)
    FusedConv2d(conv, relu=True)(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_fused_conv_runs_on_every_cpu():
    """A bf16 ``FusedConv2d`` takes oneDNN's fused bf16 kernel where the CPU has one and the
    plain bf16 conv elsewhere (oneDNN refuses bf16 convolutions on AVX2-only CPUs with an
    error); both give the conv, add and ReLU in bf16."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    fused = FusedConv2d(conv, relu=True).to(torch.bfloat16)
    x = torch.randn(2, 16, 12, 10).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    other = torch.randn(2, 16, 12, 10).to(torch.bfloat16)
    w, b = conv.weight.detach().to(torch.bfloat16), conv.bias.detach().to(torch.bfloat16)
    with torch.no_grad():
        got, got_add = fused(x), fused(x, other)
        want = F.relu(F.conv2d(x, w, b, padding=1))
        want_add = F.relu(F.conv2d(x, w, b, padding=1) + other)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got_add.float(), want_add.float(), rtol=2e-2, atol=5e-2)
