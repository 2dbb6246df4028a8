"""Mask R-CNN R50-FPN inference: ours against torchvision's maskrcnn_resnet50_fpn, same
weights (random, with calibrated BatchNorm statistics), same process, one 800x1067 image.

    python benchmarks/bench_mask_rcnn.py [--runs 5] [--threads 2]

Prints median times (torchvision; ours as built; ours with ``optimize_for_inference``), the
ratios to torchvision, and how closely the detections and pasted masks agree.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_faster_rcnn import image, lively_reference, median_time  # noqa: E402  (the same image and timing)
from common import converted, timing_args  # noqa: E402
from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from detection.optimize import optimize_for_inference  # noqa: E402
from segmentation.mask_rcnn import torchvision_to_ours  # noqa: E402


def lively_mask_reference(img: torch.Tensor) -> torch.nn.Module:
    """torchvision's random Mask R-CNN with lively box and mask heads, statistics calibrated
    on ``img`` (see ``bench_faster_rcnn.lively_reference``)."""
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        torch.nn.init.normal_(ref.roi_heads.mask_predictor.mask_fcn_logits.weight, std=0.05)
    return lively_reference(ref, img)


def ours_from(ref) -> torch.nn.Module:
    return converted(ref, "torchvision/maskrcnn_resnet50_fpn.yaml", torchvision_to_ours)


def agreement(expected: dict, got: dict) -> tuple:
    """(share of torchvision's detections that ours has too: same label, IoU > 0.99; max mask
    probability difference over those pairs)."""
    n = expected["boxes"].shape[0]
    if n == 0 or got["boxes"].shape[0] == 0:
        return float(n == got["boxes"].shape[0]), 0.0
    iou = box_iou(expected["boxes"], got["boxes"])
    iou = iou * (expected["labels"][:, None] == got["labels"][None] + 1)
    best, idx = iou.max(dim=1)
    ok = best > 0.99
    diff = (expected["masks"][ok] - got["masks"][idx[ok]]).abs().max().item() if ok.any() else 0
    return ok.float().mean().item(), diff


def main() -> None:
    args = timing_args()
    torch.manual_seed(0)
    img = image()
    ref = lively_mask_reference(img)
    plain = ours_from(ref)
    fast = optimize_for_inference(ours_from(ref), channels_last=True)
    with torch.inference_mode():
        expected = ref([img / 255])[0]
        rows = []
        for name, model in (("ours", plain), ("ours, optimized", fast)):
            share, mask_diff = agreement(expected, model([img])[0])
            rows.append((name, model, share, mask_diff))
        t_ref = median_time(lambda: ref([img / 255]), args.runs)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image 800x1067, "
              f"{expected['boxes'].shape[0]} detections, median of {args.runs} runs")
        print(f"torchvision maskrcnn_resnet50_fpn: {t_ref:.3f} s")
        for name, model, share, mask_diff in rows:
            t = median_time(lambda m=model: m([img]), args.runs)
            print(f"{name}: {t:.3f} s, ratio {t / t_ref:.2f}x; detections matched "
                  f"{100 * share:.1f} %, max |mask prob diff| {mask_diff:.1e}")


if __name__ == "__main__":
    main()
