#!/usr/bin/env python
"""Run a detector on images and write pictures with the detections drawn.

    python tools/demo.py --weights output/faster_rcnn_r18_fpn_shapes/model_final.pth \\
        --input ~/.cache/detkit/shapes/*/val --output demo_out --limit 8
    python tools/demo.py --config torchvision/fasterrcnn_resnet50_fpn.yaml \\
        --weights torchvision/fasterrcnn_resnet50_fpn.coco_v1 --input street.jpg

``--weights`` is one of our checkpoints (which carries its config and class names, so
``--config`` may be left out), a torchvision or detectron2 detector file, a URL or a zoo name.
``--input`` takes files and folders. Each picture shows every detection above
``--score-threshold`` as a box labelled with its class and score.
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

from detection.custom_imports import add_import_argument
from detection.data.image_io import read_image
from detection.data.keypoints import COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON
from detection.deploy.loading import add_runtime_arguments, load_for_inference
from detection.modeling.predictor import predict
from detection.visualization import draw_instances
from segmentation.config import get_cfg  # the full tree; registers segmentation's models
from segmentation.panoptic.visualization import draw_panoptic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(inputs, limit=None):
    files = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} is neither a file nor a folder")
    return files[:limit] if limit else files


def _keypoints(det: dict, keep: list) -> dict:
    """The keypoint arguments of ``draw_instances`` for a Keypoint R-CNN's detections: their
    keypoints, scores and, for COCO's 17 person keypoints, COCO's skeleton."""
    if "keypoints" not in det:
        return {}
    keypoints = det["keypoints"][keep].numpy()
    skeleton = COCO_PERSON_SKELETON if keypoints.shape[1] == len(COCO_PERSON_KEYPOINT_NAMES) \
        else ()
    scores = det["keypoints_scores"][keep].numpy() if "keypoints_scores" in det else None
    return {"keypoints": keypoints, "keypoint_scores": scores, "skeleton": skeleton}


def _binary_masks(det: dict, keep: list):
    """(K, H, W) bool masks of the kept detections, or None without a mask head."""
    if "binary_masks" in det:
        return det["binary_masks"][keep].numpy()
    if "masks" in det:  # probabilities (K, 1, H, W) or masks (K, H, W)
        masks = det["masks"][keep]
        masks = masks[:, 0] if masks.dim() == 4 else masks
        return (masks >= 0.5).numpy() if masks.is_floating_point() else masks.bool().numpy()
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config name or path")
    parser.add_argument("--weights", required=True, help="checkpoint path, URL or zoo name")
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", default="demo_out", help="folder for the pictures")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    add_runtime_arguments(parser, default_precision="auto")
    add_import_argument(parser)
    args = parser.parse_args(argv)

    model, _ = load_for_inference(args.config, args.weights, runtime=args.runtime,
                                  precision=args.precision or "auto", cfg=get_cfg())
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in list_images(args.input, args.limit):
        image = read_image(path)
        det = predict(model, image)
        keep = (det["scores"] >= args.score_threshold).nonzero().flatten().tolist()
        drawn = draw_instances(
            image, det["boxes"][keep].numpy(), [int(det["labels"][i]) for i in keep],
            class_names=model.metadata.class_names, scores=det["scores"][keep].tolist(),
            masks=_binary_masks(det, keep), **_keypoints(det, keep),
        )
        target = out_dir / f"{path.stem}.png"
        Image.fromarray(drawn).save(target)
        names = [det["class_names"][i] for i in keep]
        print(f"{target}: {len(keep)} detections {sorted(set(names))}")
        if "panoptic_seg" in det:  # Panoptic FPN: the merged segmentation, in a second picture
            pan = out_dir / f"{path.stem}_panoptic.png"
            Image.fromarray(draw_panoptic(image, det["panoptic_seg"].numpy(),
                                          det["segments_info"],
                                          thing_names=model.metadata.class_names,
                                          stuff_names=getattr(model.metadata, "stuff_names",
                                                              None) or None)
                            ).save(pan)
            print(f"{pan}: {len(det['segments_info'])} segments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
