"""Faster R-CNN R50-FPN inference and training step: ours against torchvision, same weights
(random, with calibrated BatchNorm statistics), same process, one 800x1067 image.

    python benchmarks/bench_faster_rcnn.py [--runs 5] [--threads 2]

Prints median times, our/torchvision ratios, whether detections agree, fvcore's FLOP count
(multiply-adds) and the achieved rate (2 x FLOPs / time).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import converted, freeze_like_pretrained, timing_args  # noqa: E402
from torchvision.models.detection import fasterrcnn_resnet50_fpn  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from detection.modeling.calibration import calibrate_batchnorm, textured_image  # noqa: E402
from detection.modeling.convert import torchvision_to_ours  # noqa: E402
from detection.optimize import optimize_for_inference  # noqa: E402


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def conv_ceiling(runs: int = 5) -> float:
    """GFLOP/s (2 per multiply-add) of a large 3x3 conv in channels_last: this CPU's fp32
    ceiling for the model's dominant layer."""
    x = torch.randn(1, 256, 200, 272).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        t = median_time(lambda: conv(x), runs)
    return 2 * 256 * 256 * 9 * 200 * 272 / t / 1e9


def image() -> torch.Tensor:
    return textured_image(800, 1067, generator=torch.Generator().manual_seed(0))


def lively_reference(ref: torch.nn.Module, img: torch.Tensor) -> torch.nn.Module:
    """torchvision's random model with livelier heads than its default init, so that scores
    pass 0.05, and BatchNorm statistics calibrated on ``img``."""
    with torch.no_grad():
        torch.nn.init.normal_(ref.rpn.head.cls_logits.weight, std=0.3)
        torch.nn.init.normal_(ref.roi_heads.box_predictor.cls_score.weight, std=0.05)
        calibrate_batchnorm(ref, lambda: ref([img / 255]))
    return ref


def ours_from(ref) -> torch.nn.Module:
    return converted(ref, "torchvision/fasterrcnn_resnet50_fpn.yaml", torchvision_to_ours)


def main() -> None:
    args = timing_args()
    torch.manual_seed(0)
    img = image()
    ref = lively_reference(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval(),
                           img)
    ours_plain = ours_from(ref).eval()
    ours = optimize_for_inference(ours_from(ref), channels_last=True)

    with torch.inference_mode():
        expected = ref([img / 255])[0]
        got = ours([img])[0]
        plain = ours_plain([img])[0]
        t_ref = median_time(lambda: ref([img / 255]), args.runs)
        t_ours = median_time(lambda: ours([img]), args.runs)
    n = expected["boxes"].shape[0]

    def agreement(res) -> float:
        """Share of torchvision's detections that ours has too (same label, IoU > 0.99);
        float32 near-ties in NMS and top-k can swap a few."""
        if n == 0:
            return 1.0
        iou = box_iou(expected["boxes"], res["boxes"])
        same = expected["labels"][:, None] == res["labels"][None] + 1
        return float(((iou > 0.99) & same).any(dim=1).float().mean())

    print(f"inference, 800x1067, {torch.get_num_threads()} threads, median of {args.runs}:")
    print(f"  torchvision {t_ref:.3f} s   ours {t_ours:.3f} s   ratio {t_ours / t_ref:.3f}")
    print(f"  detections: torchvision {n}, ours {got['boxes'].shape[0]}; found by ours: "
          f"{agreement(got):.1%} (folded, channels_last), {agreement(plain):.1%} (plain)")

    try:
        from fvcore.nn import FlopCountAnalysis

        class Wrapped(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m([x])[0]["boxes"]

        with torch.no_grad():
            flops = FlopCountAnalysis(Wrapped(ours_plain), img)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = flops.total()
        ceiling = conv_ceiling()
        print(f"  fvcore: {total / 1e9:.1f} G multiply-adds; ours achieves "
              f"{2 * total / t_ours / 1e9:.0f} GFLOP/s, torchvision {2 * total / t_ref / 1e9:.0f}")
        print(f"  conv ceiling here (3x3, 256->256, 200x272, channels_last): {ceiling:.0f} GFLOP/s"
              f"; floor for this model {2 * total / ceiling / 1e9:.2f} s "
              f"({2 * total / ceiling / 1e9 / t_ref:.2f}x torchvision)")
    except Exception as err:  # fvcore's tracer is optional here
        print(f"  fvcore count failed: {err}")

    # One training step (forward + backward + SGD), same targets, FrozenBN, freeze_at 2.
    ref_t = freeze_like_pretrained(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
    ours_t = ours_from(ref_t)
    targets = [{"boxes": torch.tensor([[100.0, 120, 400, 500], [600, 200, 900, 700]]),
                "labels": torch.tensor([1, 18])}]
    our_targets = [{"boxes": targets[0]["boxes"], "labels": targets[0]["labels"] - 1}]
    ref_t.train()
    ours_t.train()
    opt_r = torch.optim.SGD([p for p in ref_t.parameters() if p.requires_grad], lr=1e-5)
    opt_o = torch.optim.SGD([p for p in ours_t.parameters() if p.requires_grad], lr=1e-5)

    def step(model, opt, imgs, tg):
        loss = sum(model(imgs, tg).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    runs = max(2, args.runs // 2)
    t_ref_train = median_time(lambda: step(ref_t, opt_r, [img / 255], targets), runs)
    t_ours_train = median_time(lambda: step(ours_t, opt_o, [img], our_targets), runs)
    print(f"training step (1 image): torchvision {t_ref_train:.3f} s   ours {t_ours_train:.3f} s"
          f"   ratio {t_ours_train / t_ref_train:.3f}")


if __name__ == "__main__":
    main()
