#!/usr/bin/env python
"""Our models against detectron2 itself on the same weights (detectron2's `.pkl` format).

    python benchmarks/parity_detectron2.py --detectron2-src /path/to/detectron2  # its checkout
    python benchmarks/parity_detectron2.py --models cascade_mask keypoint

detectron2 is not a dependency: it is imported from an installed package or from a source
checkout given with ``--detectron2-src`` (the pure-Python modules these models use need no C++
build; detectron2's config needs ``omegaconf``, which ``--extra-path`` can point at). For each
model: detectron2's model with random weights, its FrozenBN calibrated on a textured image and
its box predictors given spread scores and real box refinements; the weights written as a
detectron2 `.pkl`; ours built from ``configs/detectron2/`` loading that file; one 800x1067 image
(no resize on either side). Prints the share of detectron2's detections reproduced (same label,
IoU > 0.99, score within 1e-3) and the worst differences of the matched ones; for keypoints,
the share within 1e-2 px after detectron2's 0.5 px shift (a near-tie of two heatmap maxima
can flip the argmax) and their logits' relative difference (torchvision's keypoint score,
ours, is the heatmap logit; detectron2's third column is a softmax score).
"""

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (detectron2 config, our config, MASK_ON)
MODELS = {
    "cascade_mask": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
                     "detectron2/cascade_mask_rcnn_R_50_FPN_1x.yaml", True),
    "cascade": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
                "detectron2/cascade_mask_rcnn_R_50_FPN_1x.yaml", False),
    "keypoint": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
                 "detectron2/keypoint_rcnn_R_50_FPN_1x.yaml", False),
}
HEIGHT, WIDTH = 800, 1067


def _spread_predictors(model: torch.nn.Module, seed: int) -> None:
    """Random class scores with a spread and box deltas large enough that each stage moves
    the boxes (detectron2 initialises them near zero)."""
    gen = torch.Generator().manual_seed(seed)
    predictors = model.roi_heads.box_predictor
    for p in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
        p.cls_score.weight.copy_(torch.randn(p.cls_score.weight.shape, generator=gen) * 0.05)
        p.cls_score.bias.copy_(torch.randn(p.cls_score.bias.shape, generator=gen))
        p.bbox_pred.weight.copy_(torch.randn(p.bbox_pred.weight.shape, generator=gen) * 0.005)
    head = getattr(model.roi_heads, "keypoint_head", None)
    if head is not None:  # peaked heatmaps: a clear maximum per keypoint
        head.score_lowres.weight.mul_(30.0)


def _match(want, got) -> dict:
    from torchvision.ops import box_iou

    wb, ws, wl = want.pred_boxes.tensor, want.scores, want.pred_classes
    gb, gs, gl = got["boxes"], got["scores"], got["labels"]
    iou = box_iou(wb, gb) if len(wb) and len(gb) else torch.zeros(len(wb), len(gb))
    out = {"detectron2": len(wb), "ours": len(gb), "kept": 0, "score": 0.0, "box": 0.0,
           "mask": 0.0, "keypoints": 0, "keypoints_close": 0, "keypoint_score": 0.0}
    for i in range(len(wb)):
        ok = (iou[i] > 0.99) & (gl == wl[i]) & ((gs - ws[i]).abs() < 1e-3)
        if not ok.any():
            continue
        j = int(torch.nonzero(ok)[0])
        out["kept"] += 1
        out["score"] = max(out["score"], float((gs[j] - ws[i]).abs()))
        out["box"] = max(out["box"], float((gb[j] - wb[i]).abs().max()))
        if want.has("pred_masks") and "masks" in got:
            wm = want.pred_masks[i].bool()
            gm = got["masks"][j].reshape(wm.shape) > 0.5
            out["mask"] = max(out["mask"], float((wm ^ gm).sum() / wm.sum().clamp(min=1)))
        if want.has("pred_keypoints") and "keypoints" in got:
            from detectron2.structures.keypoints import heatmaps_to_keypoints

            # (x, y, logit, softmax score): torchvision's keypoint score (ours) is the logit
            wk = heatmaps_to_keypoints(want.pred_keypoint_heatmaps[i:i + 1],
                                       wb[i:i + 1])[0][:, [0, 1, 2]]
            gk = got["keypoints"][j]
            # detectron2 predicts continuous coordinates; COCO's (and ours) are pixel indices
            close = (gk[:, :2] - (wk[:, :2] - 0.5)).abs().amax(1) < 1e-2
            out["keypoints"] += len(close)
            out["keypoints_close"] += int(close.sum())
            if "keypoints_scores" in got and close.any():
                rel = ((got["keypoints_scores"][j] - wk[:, 2]).abs() / wk[:, 2].abs().clamp(min=1))
                out["keypoint_score"] = max(out["keypoint_score"], float(rel[close].max()))
    return out


@torch.no_grad()
def run(name: str, d2_configs: Path, work: Path) -> dict:
    from detectron2.config import get_cfg
    from detectron2.layers import FrozenBatchNorm2d as D2FrozenBN
    from detectron2.modeling import build_model

    import detection.modeling.calibration as calibration
    from detection.modeling.predictor import load_model
    from segmentation.config import load_config

    d2_config, our_config, mask_on = MODELS[name]
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(str(d2_configs / d2_config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.02
    d2 = build_model(cfg).eval()
    image = calibration.textured_image(HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    inputs = [{"image": image.flip(0), "height": HEIGHT, "width": WIDTH}]  # detectron2: BGR
    norms = calibration.FrozenBatchNorm2d
    calibration.FrozenBatchNorm2d = (norms, D2FrozenBN)  # calibrate detectron2's own class
    try:
        calibration.calibrate_batchnorm(d2, lambda: d2(inputs))
    finally:
        calibration.FrozenBatchNorm2d = norms
    _spread_predictors(d2, seed=2)
    path = work / f"{name}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f)
    t0 = time.perf_counter()
    want = d2(inputs)[0]["instances"]
    t1 = time.perf_counter()
    ours = load_model(load_config(ROOT / "configs" / our_config,
                                  ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.02",
                                   "MODEL.MASK_ON", str(mask_on)]),
                      str(path), optimize=False, precision="fp32")
    t2 = time.perf_counter()
    got = ours([image])[0]
    t3 = time.perf_counter()
    return {**_match(want, got), "d2_s": t1 - t0, "ours_s": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectron2-src", type=Path,
                        help="a detectron2 checkout (holding detectron2/ and configs/)")
    parser.add_argument("--extra-path", type=Path, action="append", default=[],
                        help="a folder to import from (e.g. omegaconf installed with --target)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    args = parser.parse_args()
    sys.path[:0] = [str(p) for p in ([args.detectron2_src] if args.detectron2_src else [])
                    + args.extra_path]
    try:
        import detectron2
    except ImportError:
        sys.exit("detectron2 is neither installed nor given with --detectron2-src")
    d2_configs = (args.detectron2_src / "configs" if args.detectron2_src
                  else Path(detectron2.__file__).parent / "model_zoo" / "configs")
    from backbones.machine import describe

    print(describe(), flush=True)
    print("| model | detectron2 / ours detections | reproduced | worst score | worst box px "
          "| worst mask (share of area) | keypoints within 1e-2 px; their worst relative score "
          "| s detectron2 / ours |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = run(name, d2_configs, Path(tmp))
            share = 100.0 * r["kept"] / max(r["detectron2"], 1)
            print(f"| {name} | {r['detectron2']} / {r['ours']} | {share:.2f}% | "
                  f"{r['score']:.1e} | {r['box']:.1e} | {r['mask']:.4f} | "
                  f"{r['keypoints_close']} of {r['keypoints']}; {r['keypoint_score']:.1e} | "
                  f"{r['d2_s']:.1f} / {r['ours_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
