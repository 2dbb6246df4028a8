#!/usr/bin/env python
"""Print parameters and FLOPs (fvcore; one multiply-add = one FLOP) per stage.

    python tools/analyze_model.py resnet50                       # classifier, 224x224
    python tools/analyze_model.py resnet50 --style caffe         # the paper's layout
    python tools/analyze_model.py resnet50 --fpn --size 800 1216 # R50-FPN backbone
    python tools/analyze_model.py --config faster_rcnn_r50_fpn.yaml --size 800 1088
"""

import argparse
import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")

from backbones import FPN, build_backbone, list_backbones  # noqa: E402
from backbones.analysis import format_table, part_table  # noqa: E402
from detection.custom_imports import add_import_argument  # noqa: E402


class _FloatOutputs(nn.Module):
    """The model, returning only the floating-point tensors of its result dicts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        out = []
        for result in self.model(images):
            for value in result.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    out.append(value)
        return tuple(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help=f"backbone: {', '.join(list_backbones())}")
    parser.add_argument("--config", help="a detector config (name inside configs/ or path)")
    parser.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                        help="input size (default 224 224, or 800 1088 with --config)")
    parser.add_argument("--style", choices=["pytorch", "caffe"], default=None)
    parser.add_argument("--fpn", action="store_true", help="wrap the backbone in an FPN")
    parser.add_argument("--no-head", action="store_true", help="no classification head")
    parser.add_argument("--all-ops", action="store_true",
                        help="count norms, pooling and upsampling too (fvcore's default)")
    parser.add_argument("--opts", nargs="*", default=[], help="config KEY VALUE overrides")
    add_import_argument(parser)
    args = parser.parse_args(argv)

    if args.config:
        # segmentation's config is the full tree; importing it registers its model families
        from detection.families import get_family
        from detection.modeling.calibration import calibrate_batchnorm
        from segmentation.config import load_config

        cfg = load_config(args.config, list(args.opts) + ["MODEL.WEIGHTS", "",
                                                          "MODEL.BACKBONE.WEIGHTS", ""])
        model = get_family(cfg).build(cfg).eval()
        size = tuple(args.size or (800, 1088))
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)) * 255
        with torch.no_grad():  # realistic statistics, so the RPN gives its full proposal count
            calibrate_batchnorm(model, lambda: model([image]))
        body = model.backbone.bottom_up if hasattr(model.backbone, "bottom_up") \
            else model.backbone
        prefix = "backbone.bottom_up." if body is not model.backbone else "backbone."
        parts = [prefix + "stem"] + [prefix + s for s in body.stage_names]
        if body is not model.backbone:
            parts += ["backbone.lateral_convs", "backbone.output_convs"]
        # the heads: every other top-level part (rpn and roi_heads; RetinaNet's head;
        # Panoptic FPN's sem_seg_head too)
        parts += [name for name, child in model.named_children()
                  if name not in ("backbone", "preprocessor")
                  and any(True for _ in child.parameters())]
        # traced through its float outputs only (a panoptic map's segment ids and its
        # segments_info are not functions of the input that a tracer can follow)
        rows = part_table(_FloatOutputs(model), size, parts=["model." + p for p in parts],
                          macs_only=not args.all_ops, inputs=([image],))
        rows = [(name[len("model."):] if name.startswith("model.") else name, p, f)
                for name, p, f in rows]
        note = (f" (RoI heads on {cfg.MODEL.RPN.POST_NMS_TOPK_TEST} proposals)"
                if hasattr(model, "roi_heads") else "")
        print(format_table(rows, f"{args.config} at {size[0]}x{size[1]}{note}"))
        return 0
    if not args.name:
        parser.error("give a backbone name or --config")
    size = tuple(args.size or (224, 224))
    kwargs = {} if args.style is None else {"style": args.style}
    if args.fpn:
        model = FPN(build_backbone(args.name, **kwargs))
        parts = ["bottom_up." + s for s in model.bottom_up.stage_names]
        parts = ["bottom_up.stem"] + parts + ["lateral_convs", "output_convs"]
    else:
        num_classes = 0 if args.no_head else 1000
        model = build_backbone(args.name, num_classes=num_classes, **kwargs)
        parts = ["stem"] + list(model.stage_names) + (["fc"] if num_classes else [])
    rows = part_table(model, size, parts=parts, macs_only=not args.all_ops)
    style = args.style or "pytorch"
    print(format_table(rows, f"{args.name}{'-FPN' if args.fpn else ''} ({style} style) "
                             f"at {size[0]}x{size[1]}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
