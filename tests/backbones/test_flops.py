"""FLOPs against Table 1 of the paper; parameter counts against torchvision."""

import pytest
import torch
import torchvision

import backbones
from backbones.analysis import flop_count, part_table

# Table 1 (He et al. 2016), GFLOPs at 224x224, one multiply-add = one FLOP.
PAPER = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6,
         "resnet152": 11.3}
# Measured with fvcore on torchvision's layout (shared/FACTS.md), to 3 decimals.
PYTORCH_LAYOUT = {"resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089, "resnet101": 7.801,
                  "resnet152": 11.514}


def _gflops(model):
    return flop_count(model, (torch.zeros(1, 3, 224, 224),)).total() / 1e9


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(PAPER))
def test_flops_match_table1_with_paper_layout(arch):
    model = backbones.build_backbone(arch, num_classes=1000, style="caffe")
    got = _gflops(model)
    assert abs(got - PAPER[arch]) / PAPER[arch] <= 0.03, got
    pytorch = _gflops(backbones.build_backbone(arch, num_classes=1000))
    assert pytorch == pytest.approx(PYTORCH_LAYOUT[arch], abs=1e-3)
    if arch in ("resnet18", "resnet34"):  # basic blocks have no 1x1 to move the stride to
        assert pytorch == pytest.approx(got)
    else:
        assert pytorch > got * 1.015


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_parameter_counts_equal_torchvision(arch):
    ours = backbones.build_backbone(arch, num_classes=1000)
    ref = getattr(torchvision.models, arch)(weights=None)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_part_table_sums_to_total():
    rows = part_table(backbones.resnet18(num_classes=1000), (224, 224))
    names = [r[0] for r in rows]
    assert names == ["stem", "res2", "res3", "res4", "res5", "fc", "total"]
    total = rows[-1]
    assert sum(r[2] for r in rows[:-1]) == total[2]
    assert sum(r[1] for r in rows[:-1]) == total[1] == 11_689_512
