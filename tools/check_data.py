#!/usr/bin/env python
"""Check a config's datasets before training: every image file and every annotation.

    python tools/check_data.py --config faster_rcnn_r50_fpn.yaml
    python tools/check_data.py --config my.yaml --dataset data/train.json:data/images --full \\
        --json report.json

Prints one table per dataset (each kind of problem, its count, what training does about it,
the first few files or annotation ids); ``--json`` writes every unusable record and every
problem annotation. Without --dataset, DATASETS.TRAIN and DATASETS.TEST are checked. The depth
is DATALOADER.CHECK_DATA ("fast" when that is "off") unless --fast or --full is given.
Exit status: 0 when every record is usable, 1 otherwise.
"""

import argparse
import json
import sys
from pathlib import Path

import segmentation  # noqa: F401  (registers segmentation models and their config keys)
from detection.config import load_config
from detection.custom_imports import add_import_argument
from detection.data.build import check_datasets


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name (inside configs/) or path")
    parser.add_argument("--dataset", action="append", default=[],
                        help="dataset name or JSON_FILE:IMAGE_DIR (repeatable)")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--fast", dest="mode", action="store_const", const="fast",
                       help="headers and sizes only")
    depth.add_argument("--full", dest="mode", action="store_const", const="full",
                       help="also decode every image and validate every segmentation")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    add_import_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.opts)
    names = args.dataset or list(dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]))
    mode = args.mode or (cfg.DATALOADER.CHECK_DATA if cfg.DATALOADER.CHECK_DATA != "off"
                         else "fast")
    reports = check_datasets(cfg, names, mode=mode)
    for report in reports.values():
        print(report.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({n: r.to_dict() for n, r in reports.items()}, indent=1,
                                        default=str))
        print(f"report written to {args.json}")
    return 1 if any(r.unusable for r in reports.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
