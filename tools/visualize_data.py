#!/usr/bin/env python
"""Draw a dataset's ground truth (boxes and masks) into pictures, to check annotations and
augmentation before training.

    python tools/visualize_data.py --config faster_rcnn_r18_fpn_shapes.yaml --num 8
    python tools/visualize_data.py --config my.yaml --source train --out vis/   # augmented
    python tools/visualize_data.py --dataset coco_2017_val --num 20 --out vis/

``--source annotation`` (default) draws records as loaded; ``--source train`` draws what the
training data loader produces after augmentation.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from detection.custom_imports import add_import_argument
from detection.data.catalog import DatasetCatalog, get_metadata
from detection.data.image_io import read_image
from detection.data.mapper import DatasetMapper, MapDataset, annotation_to_mask
from detection.visualization import draw_instances
from segmentation.config import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config name or path")
    parser.add_argument("--dataset", default=None, help="registered dataset name "
                        "(default: the config's first DATASETS.TRAIN)")
    parser.add_argument("--source", choices=["annotation", "train"], default="annotation")
    parser.add_argument("--num", type=int, default=10, help="how many images")
    parser.add_argument("--out", default="vis_data", help="output folder")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    add_import_argument(parser)
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.opts)
    name = args.dataset or cfg.DATASETS.TRAIN[0]
    records = DatasetCatalog.get(name)
    names = get_metadata(name).get("thing_classes")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.source == "train":
        mapper = DatasetMapper.from_config(cfg, is_train=True)
        mapper.mask_on = True
        dataset = MapDataset(records, mapper, seed=cfg.SEED)
    for i, rec in enumerate(records[: args.num]):
        if args.source == "annotation":
            image = read_image(rec["file_name"])
            anns = rec.get("annotations", [])
            boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            labels = [a["category_id"] for a in anns]
            h, w = image.shape[:2]
            masks = [annotation_to_mask(a["segmentation"], h, w) for a in anns
                     if a.get("segmentation")]
            masks = np.stack(masks) if len(masks) == len(anns) and masks else None
        else:
            d = dataset[(i, 0)]
            image = d["image"].permute(1, 2, 0).numpy()
            boxes = d["instances"]["boxes"].numpy()
            labels = d["instances"]["labels"].tolist()
            masks = d["instances"].get("masks")
            masks = masks.numpy() if masks is not None else None
        drawn = draw_instances(image, boxes, labels, class_names=names, masks=masks)
        path = out_dir / f"{Path(rec['file_name']).stem}_{args.source}.png"
        Image.fromarray(drawn).save(path)
        print(f"{path}: {len(labels)} instances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
