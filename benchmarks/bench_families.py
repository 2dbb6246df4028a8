"""Keypoint R-CNN, FCOS and Cascade R-CNN R50-FPN inference: ours (plain and through
``optimize_for_inference``) against torchvision's model of the same family with the same weights
(random, BatchNorm calibrated on the image, heads lively enough for many detections), same
process, one 800x1067 image, timed round-robin within each family.

    python benchmarks/bench_families.py [--families keypoint fcos cascade] [--runs 3] [--threads 2]

Prints median seconds, the ratio to the family's torchvision row and the share of torchvision's
detections ours reproduces (same label, IoU > 0.99, score within 1e-3), with the largest
keypoint difference of the matched Keypoint R-CNN detections. torchvision has no Cascade R-CNN:
ours (random weights) is timed against its Faster R-CNN, the nearest reference, which lacks the
cascade's two further box stages.
"""

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_faster_rcnn import lively_reference as lively_faster_rcnn  # noqa: E402
from common import ROOT, converted, median_times, timing_args  # noqa: E402
from torchvision.models.detection import (  # noqa: E402
    fasterrcnn_resnet50_fpn,
    fcos_resnet50_fpn,
    keypointrcnn_resnet50_fpn,
)
from torchvision.ops import box_iou  # noqa: E402

from detection.deploy.agreement import compare_detections  # noqa: E402
from detection.families import get_family  # noqa: E402
from detection.modeling import fcos_convert  # noqa: E402
from detection.modeling.calibration import calibrate_batchnorm, textured_image  # noqa: E402
from detection.modeling.convert import torchvision_to_ours  # noqa: E402
from detection.optimize import optimize_for_inference  # noqa: E402
from segmentation.config import load_config  # noqa: E402

Detections = Dict[str, torch.Tensor]
# a family: its name, torchvision's model, ours by row name, and a note for the table
Family = Tuple[str, nn.Module, Dict[str, nn.Module], Optional[str]]


@torch.no_grad()
def keypoint_family(img: torch.Tensor) -> Family:
    """torchvision's random Keypoint R-CNN with the livelier RPN and box heads of the parity
    test (up to its 100 detections pass 0.05), BatchNorm calibrated on ``img``."""
    torch.manual_seed(0)
    ref = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    nn.init.normal_(ref.rpn.head.cls_logits.weight, std=0.3)
    nn.init.normal_(ref.roi_heads.box_predictor.cls_score.weight, std=0.05)
    nn.init.normal_(ref.roi_heads.box_predictor.bbox_pred.weight, std=0.01)
    calibrate_batchnorm(ref, lambda: ref([img / 255]))

    def ours() -> nn.Module:
        return converted(ref, "torchvision/keypointrcnn_resnet50_fpn.yaml", torchvision_to_ours)

    return ("Keypoint R-CNN", ref,
            {"ours, plain": ours(), "ours, optimized": optimize_for_inference(ours())}, None)


@torch.no_grad()
def fcos_family(img: torch.Tensor) -> Family:
    """torchvision's random FCOS with variance-preserving towers (random conv biases and
    GroupNorm affines), BatchNorm calibrated on ``img``, boxes of about one square, and class
    logits around -5.5 (the background one silenced), so that many points pass 0.2."""
    torch.manual_seed(0)
    ref = fcos_resnet50_fpn(weights=None, weights_backbone=None).eval()
    head = ref.head
    gen = torch.Generator().manual_seed(1)
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=(2 / (m.in_channels * 9)) ** 0.5)
            m.bias.normal_(0, 0.1, generator=gen)
        if isinstance(m, nn.GroupNorm):
            m.weight.uniform_(0.8, 1.2, generator=gen)
            m.bias.normal_(0, 0.1, generator=gen)
    calibrate_batchnorm(ref, lambda: ref([img / 255]))
    nn.init.normal_(head.regression_head.bbox_reg.weight, std=0.01)
    head.regression_head.bbox_reg.bias.fill_(1.0)
    nn.init.normal_(head.regression_head.bbox_ctrness.weight, std=0.02)
    head.regression_head.bbox_ctrness.bias.zero_()
    cls = head.classification_head.cls_logits
    nn.init.normal_(cls.weight, std=0.024)
    cls.bias.fill_(-5.5)
    cls.bias[0] = -30.0

    def ours() -> nn.Module:
        return converted(ref, "torchvision/fcos_resnet50_fpn.yaml", fcos_convert.to_ours)

    return ("FCOS", ref,
            {"ours, plain": ours(), "ours, optimized": optimize_for_inference(ours())}, None)


@torch.no_grad()
def cascade_family(img: torch.Tensor) -> Family:
    """Our random Cascade R-CNN (``configs/cascade_rcnn_r50_fpn.yaml``) with BatchNorm
    calibrated on ``img`` and livelier objectness and class logits, against torchvision's
    Faster R-CNN made lively as ``bench_faster_rcnn.py`` does."""
    torch.manual_seed(0)
    ref = lively_faster_rcnn(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval(),
                             img)
    cfg = load_config(str(ROOT / "configs" / "cascade_rcnn_r50_fpn.yaml"),
                      ["MODEL.BACKBONE.WEIGHTS", "", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    plain = get_family(cfg).build(cfg).eval()
    nn.init.normal_(plain.rpn.head.objectness.weight, std=0.3)
    for predictor in plain.roi_heads.box_predictor:
        nn.init.normal_(predictor.cls_score.weight, std=0.05)
    calibrate_batchnorm(plain, lambda: plain([img]))
    fast = get_family(cfg).build(cfg).eval()
    fast.load_state_dict(plain.state_dict())
    note = ("torchvision has no Cascade R-CNN: its Faster R-CNN is the nearest reference; the "
            "cascade runs two more box stages on top of it")
    return ("Cascade R-CNN", ref,
            {"ours, plain": plain, "ours, optimized": optimize_for_inference(fast)}, note)


def keypoint_diff(expected: Detections, got: Detections, *, label_offset: int,
                  iou: float = 0.99, score_tol: float = 1e-3) -> Tuple[float, int, int]:
    """Over torchvision's detections matched as ``compare_detections`` matches them: the max
    |x, y difference| of their keypoints (px), how many keypoints differ by more than 1 px,
    and how many were compared."""
    if not len(expected["boxes"]) or not len(got["boxes"]):
        return 0.0, 0, 0
    same = expected["labels"][:, None] == got["labels"][None] + label_offset
    best_iou, best = (box_iou(expected["boxes"], got["boxes"]) * same).max(dim=1)
    ok = (best_iou > iou) & ((expected["scores"] - got["scores"][best]).abs() <= score_tol)
    diff = (expected["keypoints"][ok, :, :2] - got["keypoints"][best[ok], :, :2]).abs()
    if not diff.numel():
        return 0.0, 0, 0
    per_point = diff.amax(dim=-1)
    return float(per_point.max()), int((per_point > 1).sum()), per_point.numel()


def agreement_text(expected: Detections, got: Detections, label_offset: int) -> str:
    a = compare_detections(expected, got, label_offset=label_offset)
    text = (f"{a.matched}/{a.reference} ({a.fraction:.1%}), max |box| {a.max_box_diff:.1e} px, "
            f"|score| {a.max_score_diff:.1e}")
    if "keypoints" in expected and "keypoints" in got:
        worst, over, n = keypoint_diff(expected, got, label_offset=label_offset)
        text += f", max |keypoint| {worst:.2f} px ({over}/{n} over 1 px)"
    return text


FAMILIES: Dict[str, Callable[[torch.Tensor], Family]] = {
    "keypoint": keypoint_family, "fcos": fcos_family, "cascade": cascade_family}


def run_family(build: Callable[[torch.Tensor], Family], img: torch.Tensor,
               runs: int) -> Optional[str]:
    """Print the family's rows; return its note for under the table."""
    name, ref, ours, note = build(img)
    with torch.inference_mode():
        fns = {"torchvision": lambda: ref([img / 255])}
        fns.update({row: (lambda m=m: m([img])) for row, m in ours.items()})
        outputs = {row: fn()[0] for row, fn in fns.items()}  # also the warm-up
        times = median_times(fns, runs, warmup=False)
    expected = outputs["torchvision"]
    for row, t in times.items():
        got = outputs[row]
        if row == "torchvision":
            row, agreement = ("torchvision" if note is None else "tv Faster R-CNN"), ""
        elif note is None:
            agreement = agreement_text(expected, got, label_offset=1)
        elif row == "ours, plain":
            agreement = "(another model)"
        else:  # no torchvision counterpart: against our plain model
            agreement = "vs plain: " + agreement_text(outputs["ours, plain"], got, label_offset=0)
        print(f"  {name:<15} {row:<17} {t:7.3f}s {t / times['torchvision']:6.3f} "
              f"{got['boxes'].shape[0]:5d}  {agreement}", flush=True)
    return f"  {name}: {note}" if note else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = timing_args(parser, runs=3, threads=2)
    img = textured_image(800, 1067, generator=torch.Generator().manual_seed(0))
    print(f"R50-FPN inference, one 800x1067 image, {torch.get_num_threads()} threads, median of "
          f"{args.runs} (round-robin within each family); ratio to the family's torchvision row; "
          "agreement: torchvision's detections reproduced", flush=True)
    print(f"  {'family':<15} {'model':<17} {'median':>8} {'ratio':>6} {'dets':>5}  agreement",
          flush=True)
    notes = [run_family(FAMILIES[key], img, args.runs) for key in args.families]
    for note in filter(None, notes):
        print(note)


if __name__ == "__main__":
    main()
