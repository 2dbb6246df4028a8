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
from pathlib import Path

from detection.custom_imports import add_import_argument, import_module
from detection.deploy.loading import add_runtime_arguments, load_for_evaluation
from detection.engine import distributed as du
from detection.engine.evaluation import evaluate
from detection.engine.loading import attach_evaluation_metadata
from detection.engine.result_tables import format_ap_table
from detection.engine.run_setup import setup_logging
from detection.engine.train_net import train

# The full config tree (detection's keys and segmentation's); importing segmentation registers
# its model families (Mask R-CNN, semantic) beside detection's Faster R-CNN.
from segmentation.config import load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name (inside configs/) or path")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in OUTPUT_DIR")
    parser.add_argument("--eval-only", action="store_true",
                        help="only evaluate MODEL.WEIGHTS on DATASETS.TEST")
    add_runtime_arguments(parser, when="with --eval-only: ")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    add_import_argument(parser)
    args = parser.parse_args(argv)
    for flag in ("--resume", "--eval-only"):  # also accepted after the KEY VALUE pairs
        while flag in args.opts:
            args.opts.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    while "--import" in args.opts[:-1]:
        i = args.opts.index("--import")
        import_module(args.opts[i + 1])
        args.imports.append(args.opts[i + 1])
        del args.opts[i:i + 2]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    du.init_distributed()
    overrides = [*(["TEST.RUNTIME", args.runtime] if args.runtime else []),
                 *(["TEST.PRECISION", args.precision] if args.precision else [])]
    cfg = load_config(args.config, args.opts + overrides)
    # --import modules recorded in the config, so that checkpoints name what they need
    cfg.CUSTOM_IMPORTS = list(dict.fromkeys([*cfg.CUSTOM_IMPORTS, *args.imports]))
    setup_logging(Path(cfg.OUTPUT_DIR))
    if args.eval_only:
        attach_evaluation_metadata(cfg)  # the checkpoint's or the test set's classes
        model = load_for_evaluation(cfg)  # TEST.RUNTIME, TEST.PRECISION
        results = evaluate(cfg, model)
    else:
        _, results = train(cfg, resume=args.resume)  # detection/engine/train_net.py
    if du.is_main_process() and results:
        print(format_ap_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
