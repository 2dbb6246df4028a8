#!/usr/bin/env python
"""Run a detector over COCO test-dev (or any image folder) and write the results file that
the COCO evaluation server takes: ``detections_test-dev2017_<alg>_results.json``, zipped.

    python tools/submit_coco.py --weights out/r50/model_final.pth \\
        --image-info datasets/coco/annotations/image_info_test-dev2017.json \\
        --image-root datasets/coco/test2017 --alg myr50 --output submission/
    python tools/submit_coco.py --weights model.pth --images some/folder --split val2017

With ``--image-info`` (a COCO json whose ``images`` list gives ids and file names; no
annotations needed) every listed image is run. With ``--images`` the image id is the number in
each file name (COCO names files by id, e.g. 000000000139.jpg). Category ids come from the
model's metadata. Masks are written too when the model predicts them (``segmentations_``...).
"""

import argparse
import json
import re
import sys
from pathlib import Path

from tqdm import tqdm

from detection.custom_imports import add_import_argument
from detection.data.image_io import read_image
from detection.deploy.loading import add_runtime_arguments, load_for_inference
from detection.evaluation.coco_evaluation import detections_to_coco_results, write_coco_submission
from detection.modeling.predictor import predict
from segmentation.config import get_cfg  # the full tree; registers segmentation's models


def images_from_info(info_json: Path, image_root: Path):
    with open(info_json) as f:
        data = json.load(f)
    if "images" not in data:
        raise ValueError(f"{info_json} has no 'images' list")
    return [(int(im["id"]), image_root / im["file_name"]) for im in data["images"]]


def images_from_folder(folder: Path):
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        digits = re.findall(r"\d+", p.stem)
        if not digits:
            raise ValueError(f"{p}: no image id in the file name; use --image-info instead")
        out.append((int(digits[-1]), p))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config (default: the checkpoint's)")
    parser.add_argument("--weights", required=True)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-info", type=Path, help="COCO image-info json (test-dev)")
    src.add_argument("--images", type=Path, help="a folder of images named by id")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder of the images listed in --image-info")
    parser.add_argument("--split", default="test-dev2017",
                        choices=["test-dev2017", "val2017", "test-challenge2017"])
    parser.add_argument("--alg", default="detkit", help="algorithm name in the file name")
    parser.add_argument("--output", type=Path, default=Path("submission"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    add_runtime_arguments(parser)
    add_import_argument(parser)
    args = parser.parse_args(argv)

    model, _ = load_for_inference(args.config, args.weights, runtime=args.runtime,
                                  precision=args.precision, cfg=get_cfg())
    if args.image_info is not None:
        root = args.image_root or args.image_info.parent
        images = images_from_info(args.image_info, root)
    else:
        images = images_from_folder(args.images)
    images = images[: args.limit] if args.limit else images
    ids = model.metadata.category_ids
    boxes, segms = [], []
    for image_id, path in tqdm(images, desc="detect"):
        det = predict(model, read_image(path))
        entries = detections_to_coco_results(image_id, det, ids, with_masks="masks" in det)
        for e in entries:
            if "segmentation" in e:
                segms.append({k: v for k, v in e.items() if k != "bbox"})
            boxes.append({k: v for k, v in e.items() if k != "segmentation"})
    path = write_coco_submission(boxes, args.output, split=args.split, alg=args.alg)
    print(f"{len(boxes)} detections on {len(images)} images -> {path}")
    if segms:
        path = write_coco_submission(segms, args.output, split=args.split, alg=args.alg,
                                     kind="segmentations")
        print(f"{len(segms)} masks -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
