#!/usr/bin/env python
"""Forward time of our backbones against torchvision's, same weights, same process.

    python benchmarks/bench_backbones.py     # resnet50 @224 (batch 1, 8), R50-FPN @800x1216
    python benchmarks/bench_backbones.py --runs 10

Ours runs as deployed for inference: FrozenBN folded into the convs and channels_last
(``backbones.prepare_for_inference``). torchvision runs as its detectors do (FrozenBN).
Prints the median time of each and the ratio ours / torchvision.
"""

import argparse
import statistics
import time

import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import backbones
from backbones import machine
from backbones.convert import torchvision_resnet_to_ours


def _median_time(fn, x, runs: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fpn_state_to_ours(sd):
    out = {"bottom_up." + k: v for k, v in torchvision_resnet_to_ours(
        {k[5:]: v for k, v in sd.items() if k.startswith("body.")}).items()}
    for k, v in sd.items():
        if k.startswith("fpn."):
            kind = "lateral_convs" if "inner_blocks" in k else "output_convs"
            parts = k.split(".")
            out[f"{kind}.{parts[2]}.conv.{parts[-1]}"] = v
    return out


def bench_classifier(batch: int, runs: int) -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    ours = backbones.resnet50(num_classes=1000, norm="FrozenBN")
    ours.load_state_dict(torchvision_resnet_to_ours(ref.state_dict()))
    ours = backbones.prepare_for_inference(ours)
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x)["logits"] - ref(x)).abs().max().item()
    t_ref = _median_time(ref, x, runs)
    t_ours = _median_time(ours, x, runs)
    print(f"resnet50 224x224 batch {batch}: torchvision {t_ref * 1e3:.1f} ms, ours "
          f"{t_ours * 1e3:.1f} ms, ratio {t_ours / t_ref:.3f} (max |logit diff| {diff:.1e})")


def bench_fpn(runs: int) -> None:
    torch.manual_seed(0)
    ref = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3).eval()
    ours = backbones.FPN(backbones.resnet50(norm="FrozenBN"), out_channels=256)
    ours.load_state_dict(_fpn_state_to_ours(ref.state_dict()))
    ours = backbones.prepare_for_inference(ours)
    x = torch.randn(1, 3, 800, 1216)
    with torch.no_grad():
        diff = max((a - b).abs().max().item() for a, b in zip(ours(x).values(),
                                                                ref(x).values()))
    t_ref = _median_time(ref, x, runs)
    t_ours = _median_time(ours, x, runs)
    print(f"R50-FPN 800x1216: torchvision {t_ref:.3f} s, ours {t_ours:.3f} s, "
          f"ratio {t_ours / t_ref:.3f} (max |feature diff| {diff:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(machine.describe(), flush=True)  # the machine heads every table
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_classifier(1, args.runs * 3)
    bench_classifier(8, args.runs)
    bench_fpn(args.runs)


if __name__ == "__main__":
    main()
