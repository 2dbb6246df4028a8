"""Loading a detector from a config and weights, and running it on one image of any common
type.

    model = load_model("detectron2/faster_rcnn_R_50_FPN_3x")          # a zoo name
    model = load_model("configs/faster_rcnn_r50_fpn.yaml", "out/model_final.pth")
    result = predict(model, "street.jpg")   # boxes (N, 4) in image pixels, scores, names
"""

import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
from fvcore.common.config import CfgNode
from torch import Tensor

from .faster_rcnn import GeneralizedRCNN
from .metadata import Metadata
from .zoo import get_detector_weights, list_detector_weights

logger = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Tensor, np.ndarray, Any]

def get_model_cfg(config: Union[str, os.PathLike, CfgNode]) -> CfgNode:
    """A config from a YAML path (``_BASE_`` resolved) or a CfgNode (cloned)."""
    from detection.config import get_cfg

    if isinstance(config, CfgNode):
        return config.clone()
    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    return cfg


def read_weights(weights: str) -> Mapping[str, Any]:
    """A checkpoint dict from a zoo name, URL or local path, read without running code."""
    from backbones.weights import download_weights, read_checkpoint

    if weights in list_detector_weights():
        path = download_weights(get_detector_weights(weights).url,
                                sha256=get_detector_weights(weights).sha256_prefix)
    elif weights.startswith(("http://", "https://")):
        path = download_weights(weights)
    else:
        path = Path(weights)
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if str(path).endswith((".pth", ".pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ckpt, Mapping):
            return ckpt
    params, meta = read_checkpoint(path)
    return {"model": params, **meta}


def load_model(config: Union[str, os.PathLike, CfgNode], weights: Optional[str] = None, *,
               device: str = "cpu", optimize: bool = True, runtime: str = "torch",
               precision: str = "auto", tta: Optional[bool] = None) -> Any:
    """Build the detector of ``config`` (a YAML path, a CfgNode or a zoo name) and load
    ``weights`` (zoo name, URL or path; default ``MODEL.WEIGHTS``), in torchvision's,
    detectron2's or our format. Returns it in eval mode, optimized for inference
    (``detection.optimize``: norms folded, ReLUs fused, channels-last) when ``optimize``.

    ``runtime`` "onnxruntime" or "openvino" exports the model to ONNX (once: the file is
    cached under ``~/.cache/detkit/exported``) and returns it running in that runtime, with
    the same call convention and ``predict``. ``config`` may also be a directory written by
    ``tools/export_model.py``. ``precision`` "bf16" runs the convolutions in bf16 (torch and
    openvino runtimes) and keeps boxes, scores and NMS in float32; it needs native bf16
    (``backbones.machine``). "auto" (the default) is bf16 where the device has it natively
    and float32 elsewhere, and always float32 with ``optimize=False`` or onnxruntime; the
    log says which runs. Evaluation and submission ask for "fp32" unless told otherwise.

    ``tta`` True (default: the config's ``TEST.AUG.ENABLED``) returns the model wrapped in
    ``detection.modeling.tta.DetectorWithTTA`` (``TEST.AUG`` sizes and flip; torch runtime
    only), which ``predict`` takes as it takes the model."""
    from backbones.machine import require_precision
    from detection.deploy import RUNTIMES, load_exported, require
    from detection.optimize import optimize_for_inference, supports_bf16

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime != "torch":
        require(runtime)
    if isinstance(config, (str, os.PathLike)) and Path(config, "export.json").is_file():
        if tta:
            raise ValueError("test-time augmentation needs the eager model (a config and "
                             "weights), not an exported one")
        return load_exported(Path(config), None if runtime == "torch" else runtime,
                             precision=precision)
    if isinstance(config, str) and config in list_detector_weights():
        entry = get_detector_weights(config)
        weights = weights or config
        config = entry.config_path
    cfg = get_model_cfg(config)
    weights = weights or cfg.MODEL.WEIGHTS
    if weights:  # a checkpoint trained with the config's float32 recipe is built as trained
        from detection.engine.loading import apply_checkpoint_fallback

        apply_checkpoint_fallback(cfg, weights)
    cfg.MODEL.BACKBONE.WEIGHTS = ""  # the detector checkpoint holds the backbone too
    cfg.MODEL.DEVICE = device
    from detection.families import get_family  # the model family table (builder, loader)

    family = get_family(cfg)
    model = family.build(cfg)
    if weights:
        ckpt = family.load_weights(model, weights)
        if isinstance(ckpt.get("metadata"), Mapping) and "class_names" in ckpt["metadata"]:
            model.metadata = Metadata.from_dict(ckpt["metadata"])
    model.eval()
    if runtime != "torch":
        from detection.deploy import export_cached
        from detection.modeling.tta import tta_settings

        if tta or (tta is None and tta_settings(cfg)[0]):
            raise ValueError(f"test-time augmentation (TEST.AUG.ENABLED) runs in the torch "
                             f"runtime only, not {runtime!r}")

        return export_cached(model, cfg, weights, runtime=runtime, precision=precision)
    asked = precision
    if precision == "auto":  # bf16 only where native, and where the model has a bf16 split
        precision = require_precision("auto", device) \
            if optimize and supports_bf16(model) else "fp32"
    if optimize:
        optimize_for_inference(model, precision=precision)
    elif precision != "fp32":
        raise ValueError(f"precision {precision!r} needs optimize=True")
    logger.info("Inference in %s%s on %s", getattr(model, "precision", "fp32"),
                f" (asked: {asked})" if asked != precision else "", device)
    from detection.modeling.tta import build_tta_model

    return build_tta_model(cfg, model, enabled=tta)


def to_image_tensor(image: ImageLike) -> Tensor:
    """An RGB ``(3, H, W)`` tensor (0-255) from a path, PIL image, HWC numpy array or CHW
    tensor (as given), decoded as training and evaluation decode files
    (``detection.data.image_io.as_rgb_array``)."""
    if isinstance(image, Tensor):
        return image
    from detection.data.image_io import as_rgb_array

    return torch.from_numpy(as_rgb_array(image)).permute(2, 0, 1)


@torch.no_grad()
def predict(model: GeneralizedRCNN, image: ImageLike) -> Dict[str, Any]:
    """Detections on one image: ``boxes`` ``(N, 4)`` xyxy in its pixels, ``scores``,
    ``labels`` (contiguous), ``category_ids`` and ``class_names`` (lists)."""
    was_training = model.training
    model.eval()
    out = model([to_image_tensor(image)])[0]
    model.train(was_training)
    labels = out["labels"].tolist()
    meta = model.metadata
    return {**out, "category_ids": meta.dataset_ids(labels),
            "class_names": [meta.class_names[k] for k in labels]}
