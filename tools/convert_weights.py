"""Convert a torchvision or detectron2 checkpoint of any model family into ours.

    python tools/convert_weights.py --config configs/detectron2/faster_rcnn_R_50_FPN_3x.yaml \
        --weights model_final_280758.pkl --output r50_fpn_3x.pth

The config's family (``MODEL.META_ARCHITECTURE``: Faster, Mask and Keypoint R-CNN, RetinaNet,
FCOS, Panoptic FPN, semantic segmentation) builds the model and reads the checkpoint, every key
used.

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

from detection.custom_imports import add_import_argument
from detection.families import get_family  # noqa: E402
from detection.modeling.zoo import get_detector_weights, list_detector_weights  # noqa: E402
from segmentation.config import load_config  # noqa: E402  (the full tree; registers families)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (default: the zoo entry's)")
    parser.add_argument("--weights", required=True, help="zoo name, URL or path")
    parser.add_argument("--output", required=True, help="where to write our checkpoint")
    add_import_argument(parser)
    args = parser.parse_args(argv)
    config = args.config
    if config is None:
        if args.weights not in list_detector_weights():
            parser.error("--config is needed unless --weights is a zoo name")
        config = get_detector_weights(args.weights).config_path
    cfg = load_config(config, ["MODEL.BACKBONE.WEIGHTS", ""])
    family = get_family(cfg)
    model = family.build(cfg)
    family.load_weights(model, args.weights)  # converted; every key must fit
    metadata = getattr(model, "metadata", None)
    out = {"model": model.state_dict(), "config": cfg.dump(),
           "metadata": metadata.to_dict() if metadata is not None else {}}
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
    classes = getattr(model, "num_classes", None)
    print(f"wrote {dst}: {len(out['model'])} tensors"
          + (f", {classes} classes" if classes is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
