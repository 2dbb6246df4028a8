"""What each lower precision keeps of a trained detector's float32 detections, and its AP:
torch bf16 (where the CPU has native bf16) and OpenVINO's float32 and int8 (backbone quantized
by NNCF, heads in float32), against the eager float32 model, over the config's test set.

    python benchmarks/bench_precision.py \\
        --weights output/faster_rcnn_r18_fpn_shapes/model_final.pth [--calibration-images 300]

A detection is kept when the candidate has one of the same label with IoU > 0.95 and a score
within 0.02 (float32 detections scoring under 0.07 are left out: near the 0.05 threshold they
may fall under it). Prints, per precision, the share kept, box AP and AP50, and seconds per
image in the evaluation loop.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbones.machine import PrecisionUnavailable, describe  # noqa: E402
from detection.deploy import export_model, load_exported  # noqa: E402
from detection.deploy.agreement import compare_detections  # noqa: E402
from detection.deploy.quantize import (  # noqa: E402
    AGREEMENT_BAR,
    calibration_images,
    quantize_export,
)
from detection.engine.evaluation import evaluate  # noqa: E402
from detection.engine.loading import inference_config  # noqa: E402
from detection.modeling.predictor import load_model  # noqa: E402
from segmentation.config import get_cfg  # noqa: E402


class Recorder:
    """A model for ``evaluate`` that keeps every output, in order, and the time it took."""

    training, device = False, torch.device("cpu")

    def __init__(self, model) -> None:
        self.model, self.outputs, self.seconds = model, [], 0.0

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, images):
        t0 = time.perf_counter()
        out = self.model(images)
        self.seconds += time.perf_counter() - t0
        self.outputs += [{k: v for k, v in o.items() if k in ("boxes", "scores", "labels")}
                         for o in out]
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--validation-images", type=int, default=100,
                        help="int8 accuracy control on as many other training images (0: none)")
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--output", default=None, help="folder for the exports (default: tmp)")
    args = parser.parse_args()
    print(describe(), flush=True)
    cfg = inference_config(args.config, args.weights, cfg=get_cfg())
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="bench_precision_")
    export_dir = Path(args.output or cfg.OUTPUT_DIR) / "openvino"
    eager = load_model(cfg, args.weights, optimize=False, precision="fp32")
    export_model(eager, export_dir, "openvino")
    t0 = time.perf_counter()
    images, checked = calibration_images(cfg, args.calibration_images,
                                         validation=args.validation_images)
    quantize_export(export_dir, images, validation_images=checked or None,
                    max_drop=args.max_drop)
    parts = json.loads((export_dir / "export.json").read_text())["parts"]
    int8_note = (f"int8 calibrated on {len(images)} images of {cfg.DATASETS.TRAIN[0]}"
                 + (f", accuracy control on {len(checked)} others (max drop {args.max_drop}; "
                    f"kept there {parts['int8_detections_kept']:.2%})" if checked else "")
                 + f", {len(parts['int8_float_convs'])} convolutions left in float32 "
                 f"({time.perf_counter() - t0:.0f} s): {', '.join(parts['int8_float_convs'])}")
    makers = {
        "torch fp32 (eager)": lambda: eager,
        "torch fp32 (optimized)": lambda: load_model(cfg, args.weights, precision="fp32"),
        "torch bf16": lambda: load_model(cfg, args.weights, precision="bf16"),
        "OpenVINO fp32": lambda: load_exported(export_dir, "openvino", precision="fp32"),
        "OpenVINO bf16 (split)": lambda: load_exported(export_dir, "openvino",
                                                       precision="bf16"),
        "OpenVINO int8 (backbone int8, heads f32)":
            lambda: load_exported(export_dir, "openvino", precision="int8"),
    }
    rows, reference = [], None
    for name, make in makers.items():
        try:
            model = Recorder(make())
        except PrecisionUnavailable as e:
            rows.append(f"| {name} | skipped: {str(e).split(';')[0]} | | | |")
            continue
        bbox = evaluate(cfg, model)["bbox"]
        if reference is None:
            reference = model.outputs
        matched = total = 0
        for ref, got in zip(reference, model.outputs):
            a = compare_detections(ref, got, **AGREEMENT_BAR)
            matched, total = matched + a.matched, total + a.reference
        per_image = model.seconds / max(len(model.outputs), 1)
        rows.append(f"| {name} | {matched / max(total, 1):.2%} of {total} | {bbox['AP']:.2f} | "
                    f"{bbox['AP50']:.2f} | {per_image * 1000:.1f} ms |")
    print(f"\n{cfg.DATASETS.TEST[0]}, {args.weights}; {int8_note}\n")
    print("| precision | float32 detections kept | box AP | AP50 | per image |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
