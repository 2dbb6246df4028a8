"""What the detector benchmarks share: their timing arguments, and our model converted from a
torchvision reference."""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import segmentation  # noqa: E402, F401  (registers Mask R-CNN and segmentation's config keys)
from backbones.machine import describe  # noqa: E402
from detection.families import get_family  # noqa: E402
from detection.modeling.convert import load_state_dict  # noqa: E402
from segmentation.config import load_config  # noqa: E402  (the full defaults tree)


def timing_args(parser: Optional[argparse.ArgumentParser] = None, *, runs: int = 5,
                threads: int = 0) -> argparse.Namespace:
    """``--runs`` (median of, default ``runs``) and ``--threads`` (default ``threads``; 0:
    torch's default) added to ``parser``, parsed; the thread count applied."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--threads", type=int, default=threads)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(), flush=True)  # the machine heads every table
    return args


def median_times(fns: Dict[str, Callable[[], object]], runs: int, *,
                 warmup: bool = True) -> Dict[str, float]:
    """Median seconds of each function, timed round-robin (after a warm-up call of each,
    unless the caller has made it), so that a change in the machine's load touches every row
    alike."""
    if warmup:
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


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
