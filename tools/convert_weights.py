"""Convert a torchvision or detectron2 Faster R-CNN checkpoint into ours.

    python tools/convert_weights.py --config configs/detectron2/faster_rcnn_R_50_FPN_3x.yaml \
        --weights model_final_280758.pkl --output r50_fpn_3x.pth

The output is ``{"model": state_dict, "config": <YAML>, "metadata": {...}}``, written
atomically; ``detection.modeling.predictor.load_model(config, output)`` reads it.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.modeling.build import build_model  # noqa: E402
from detection.modeling.convert import load_state_dict, to_ours  # noqa: E402
from detection.modeling.predictor import get_model_cfg, read_weights  # noqa: E402
from detection.modeling.zoo import get_detector_weights, list_detector_weights  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (default: the zoo entry's)")
    parser.add_argument("--weights", required=True, help="zoo name, URL or path")
    parser.add_argument("--output", required=True, help="where to write our checkpoint")
    args = parser.parse_args(argv)
    config = args.config
    if config is None:
        if args.weights not in list_detector_weights():
            parser.error("--config is needed unless --weights is a zoo name")
        config = get_detector_weights(args.weights).config_path
    cfg = get_model_cfg(config)
    cfg.MODEL.BACKBONE.WEIGHTS = ""
    model = build_model(cfg)
    state = to_ours(read_weights(args.weights))
    load_state_dict(model, state)  # every key must fit
    out = {"model": model.state_dict(), "config": cfg.dump(),
           "metadata": model.metadata.to_dict()}
    dst = Path(args.output)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".partial")
    os.close(fd)
    try:
        torch.save(out, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {dst}: {len(out['model'])} tensors, {model.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
