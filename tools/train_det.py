#!/usr/bin/env python
"""Train (and evaluate) a detector from a config.

    python tools/train_det.py --config faster_rcnn_r18_fpn_shapes.yaml         # offline demo
    python tools/train_det.py --config faster_rcnn_r101_fpn.yaml OUTPUT_DIR out/r101
    python tools/train_det.py --config faster_rcnn_r50_fpn.yaml --resume OUTPUT_DIR out/r50
    python tools/train_det.py --config faster_rcnn_r50_fpn.yaml --eval-only \\
        MODEL.WEIGHTS out/r50/model_final.pth
    torchrun --nproc_per_node 8 tools/train_det.py --config faster_rcnn_r50_fpn.yaml

A config name resolves inside configs/; a path works too. Trailing KEY VALUE pairs override
the config.
"""

import argparse
import sys

import segmentation  # noqa: F401  (registers segmentation models)
from detection.config import load_config
from detection.engine import distributed as du
from detection.engine import runner


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name (inside configs/) or path")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in OUTPUT_DIR")
    parser.add_argument("--eval-only", action="store_true",
                        help="only evaluate MODEL.WEIGHTS on DATASETS.TEST")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    for flag in ("--resume", "--eval-only"):  # also accepted after the KEY VALUE pairs
        while flag in args.opts:
            args.opts.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    du.init_distributed()
    cfg = load_config(args.config, args.opts)
    from pathlib import Path

    runner.setup_logging(Path(cfg.OUTPUT_DIR))
    if args.eval_only:
        runner.attach_dataset_metadata(cfg)
        model = runner.build_model_from_cfg(cfg)
        runner.load_weights(model, cfg.MODEL.WEIGHTS)
        results = runner.evaluate(cfg, model)
    else:
        _, results = runner.train(cfg, resume=args.resume)
    if du.is_main_process() and results:
        print(runner.format_ap_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
