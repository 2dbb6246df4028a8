#!/usr/bin/env python
"""Export a detector to ONNX, TorchScript or OpenVINO IR: Faster R-CNN or Mask R-CNN (FPN or
C4), Cascade (Mask) R-CNN, Keypoint R-CNN, RetinaNet or FCOS.

    python tools/export_model.py --weights output/faster_rcnn_r18_fpn_shapes/model_final.pth \\
        --format onnx --output exported/shapes_onnx
    python tools/export_model.py --config torchvision/fasterrcnn_resnet50_fpn.yaml \\
        --weights torchvision/fasterrcnn_resnet50_fpn.coco_v1 --format openvino --output ov/
    python tools/demo.py --weights exported/shapes_onnx --input img.jpg      # runs the export

The exported graph takes one RGB image (3, H, W), float32 on a 0-255 scale, of any size, and
returns boxes (N, 4) in its pixels, scores, labels (and masks (N, 1, H, W) for Mask R-CNN,
keypoints (N, P, 3) and keypoints_scores (N, P) for Keypoint R-CNN): resizing, normalization
and the mapping back to input pixels are inside it. After writing, the tool runs the file on
two sample images, compares it with the eager model and prints the agreement (also stored in
OUTPUT/export.json).

OpenVINO IR exports (and ONNX ones with --split) also hold the model as three graphs, preprocess,
backbone and heads, so that `--runtime openvino --precision bf16` runs the backbone in bf16 and the
heads in float32 (OpenVINO's own bf16 would run the heads in bf16 too and lose detections).

`--precision int8` also quantizes the backbone graph to int8 with NNCF, calibrated on
`--calibration-images` images of the config's training set, for CPUs without native bf16
(`--runtime openvino --precision int8` runs it; the heads stay float32). NNCF's accuracy
control then puts the layers that move detections most back into float32 until at most
`--max-drop` of float32's detections on `--validation-images` other training images are lost
(`--validation-images 0`: every layer stays int8). On 2 cores the accuracy control takes
about 20 minutes for the shapes default (the plain quantization about one):

    python tools/export_model.py --weights output/faster_rcnn_r18_fpn_shapes/model_final.pth \
        --format openvino --precision int8 --calibration-images 300 --output exported/int8
"""

import argparse
import json
import sys
from pathlib import Path

from detection.custom_imports import add_import_argument
from detection.deploy import FORMATS, check_export, export_model
from detection.deploy.quantize import calibration_images, quantize_export
from detection.engine.loading import inference_config
from detection.modeling.predictor import load_model
from segmentation.config import get_cfg  # the full tree; registers segmentation's models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config (default: the checkpoint's)")
    parser.add_argument("--weights", required=True, help="checkpoint path, URL or zoo name")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--output", type=Path, required=True, help="folder to write into")
    parser.add_argument("--trace-size", type=int, nargs=2, default=(480, 640),
                        metavar=("H", "W"), help="size of the sample image traced")
    parser.add_argument("--split", action="store_true", default=None,
                        help="also write preprocess, backbone and heads graphs "
                             "(default for openvino)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip running the export against the eager model")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="int8: also quantize the backbone graph (NNCF, OpenVINO)")
    parser.add_argument("--calibration-images", type=int, default=300, metavar="N",
                        help="int8: images of DATASETS.TRAIN to calibrate on")
    parser.add_argument("--validation-images", type=int, default=100, metavar="N",
                        help="int8: other images of DATASETS.TRAIN on which at most "
                             "--max-drop of float32's detections may be lost (0: no check, "
                             "every layer int8)")
    parser.add_argument("--max-drop", type=float, default=0.01,
                        help="int8: share of float32's detections that may be lost")
    add_import_argument(parser)
    args = parser.parse_args(argv)
    if args.precision == "int8" and args.format == "torchscript":
        parser.error("--precision int8 needs --format openvino (or onnx)")

    cfg = inference_config(args.config, args.weights, cfg=get_cfg())
    model = load_model(cfg, args.weights, optimize=False)
    info = export_model(model, args.output, args.format, trace_size=tuple(args.trace_size),
                        source={"weights": args.weights, "config": args.config or ""},
                        # None: export_model's default (split graphs for openvino)
                        split=True if args.split or args.precision == "int8" else None)
    print(f"wrote {args.output / info.model_file} ({args.format}; outputs "
          f"{', '.join(info.outputs)}; {len(info.class_names)} classes)")
    if info.parts:
        print(f"and {info.parts['backbone']} + {info.parts['heads']} (for bf16 in OpenVINO)")
    if not args.no_check:
        check = check_export(model, args.output)
        for result in check["images"]:
            h, w = result["size"]
            print(f"check in {check['runtime']} on a {h}x{w} image: {result['agreement']}")
        if check["fraction"] < 0.99:
            print("warning: the export reproduces fewer than 99% of the eager detections",
                  file=sys.stderr)
            return 1
    if args.precision == "int8":
        images, checked = calibration_images(cfg, args.calibration_images,
                                             validation=args.validation_images)
        path = quantize_export(args.output, images, validation_images=checked or None,
                               max_drop=args.max_drop)
        parts = json.loads((args.output / "export.json").read_text())["parts"]
        kept = (f"; {parts['int8_detections_kept']:.2%} of float32's detections kept on "
                f"{len(checked)} other images" if checked else "")
        print(f"int8 backbone: {path} (calibrated on {len(images)} images of "
              f"{cfg.DATASETS.TRAIN[0]}; {len(parts['int8_float_convs'])} convolutions left "
              f"in float32{kept}); run it with --runtime openvino --precision int8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
