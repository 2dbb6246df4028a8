"""What the detector benchmarks share: their timing arguments, and our model converted from a
torchvision reference."""

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import segmentation  # noqa: E402, F401  (registers Mask R-CNN and segmentation's config keys)
from backbones.machine import describe  # noqa: E402
from detection.families import get_family  # noqa: E402
from detection.modeling.convert import load_state_dict  # noqa: E402
from segmentation.config import load_config  # noqa: E402  (the full defaults tree)


def timing_args(parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """``--runs`` (median of, default 5) and ``--threads`` (0: torch's default) added to
    ``parser``, parsed; the thread count applied."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(), flush=True)  # the machine heads every table
    return args


def freeze_like_pretrained(ref: torch.nn.Module) -> torch.nn.Module:
    """torchvision's detector as ``trainable_backbone_layers=3`` builds it with pretrained
    weights (it ignores the argument without them): FrozenBN, the stem and layer1 frozen."""
    from backbones import freeze_batchnorm

    freeze_batchnorm(ref.backbone.body)
    for name, p in ref.backbone.body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    return ref


def converted(ref: torch.nn.Module, config: str,
              convert: Callable[[dict], dict]) -> torch.nn.Module:
    """Our model of ``configs/<config>`` (no pretrained backbone), in eval mode, holding
    ``ref``'s weights through ``convert`` (every key used)."""
    cfg = load_config(str(ROOT / "configs" / config),
                      ["MODEL.BACKBONE.WEIGHTS", "", "MODEL.WEIGHTS", ""])
    model = get_family(cfg).build(cfg).eval()
    load_state_dict(model, convert(ref.state_dict()))
    return model
