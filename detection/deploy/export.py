"""Exporting a detector to ONNX, TorchScript or OpenVINO IR, as one graph from an RGB image to
detections in that image's pixels. The families covered: Faster R-CNN and Mask R-CNN (FPN or
C4), Cascade (Mask) R-CNN, Keypoint R-CNN, RetinaNet and FCOS.

The graph is traced from the plain model (no fused oneDNN ops, no bf16): the model's code
keeps image sizes symbolic under tracing (``detection.modeling.tracing``), so resizing,
normalization, padding, anchors or points, proposals, RoI pooling, NMS, the mapping of boxes
back to input pixels, the pasting of masks and the decoding of keypoint heatmaps are all
inside the graph, and the graph runs on any image size.

    graph input   image   (3, H, W) float32, RGB, 0-255
    graph outputs boxes   (N, 4) float32, xyxy in the input's pixels
                  scores  (N,) float32
                  labels  (N,) int64, contiguous 0..K-1 (names in export.json)
                  masks   (N, 1, H, W) float32 mask probabilities (Mask R-CNN only)
                  keypoints         (N, P, 3) float32, (x, y, 1) in the input's pixels
                  keypoints_scores  (N, P) float32 heatmap logits (Keypoint R-CNN only)

Next to the model file, ``export.json`` records the format, the outputs, the class names and
dataset category ids, the mask threshold and the agreement check that the exporter ran.
"""

import json
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

FORMATS = ("onnx", "torchscript", "openvino")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "openvino": "model.xml"}
OPSET = 17
SPLIT_FORMATS = ("onnx", "openvino")
# The model families that export covers.
COVERED = ("Faster R-CNN, Mask R-CNN (FPN or C4), Cascade (Mask) R-CNN, Keypoint R-CNN, "
           "RetinaNet and FCOS")
# Outputs of the eager model that the runtimes derive from the graph's (``runtimes.py``).
DERIVED_OUTPUTS = ("binary_masks",)


class UnsupportedExportError(ValueError):
    """The model holds a part that the chosen format cannot represent."""


class SingleImageGraph(nn.Module):
    """What is exported: the detector on one image, returning its outputs
    (``_output_names``) as a tuple of tensors. An output of the eager model that the graph
    would not return raises ``UnsupportedExportError`` rather than being dropped."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.output_names = _output_names(model)

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        out = self.model([image])[0]
        missing = [name for name in self.output_names if name not in out]
        if missing:
            raise UnsupportedExportError(f"the model's output lacks {', '.join(missing)}")
        dropped = sorted(set(out) - set(self.output_names) - set(DERIVED_OUTPUTS))
        if dropped:
            raise UnsupportedExportError(
                f"the model ({type(self.model).__name__}) also returns {', '.join(dropped)}, "
                f"which the exported graph has no output for (export covers {COVERED})")
        return tuple(out[name] for name in self.output_names)


@dataclass
class ExportInfo:
    """The contents of ``export.json``."""

    format: str
    model_file: str
    outputs: List[str]
    class_names: List[str]
    category_ids: List[int]
    mask_threshold: float = 0.5
    source: Dict[str, str] = field(default_factory=dict)
    # A split export's graphs: {"backbone": file, "heads": file, "features": [names]}.
    parts: Dict[str, Any] = field(default_factory=dict)
    check: Dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        (directory / "export.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "ExportInfo":
        path = Path(directory) / "export.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a directory written "
                                    "by tools/export_model.py")
        return cls(**json.loads(path.read_text()))


def unsupported_parts(model: nn.Module, fmt: str) -> List[str]:
    """The parts of ``model`` that ``fmt`` cannot represent, each named with the reason
    (empty: exportable); a model outside the covered families (``COVERED``) is one."""
    bad = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if fmt in ("onnx", "openvino") and kind == "DeformConv2d":
            bad.append(f"{name} (deformable convolution: torchvision's deform_conv2d has no "
                       "ONNX export; use --format torchscript)")
        if kind in ("FusedConv2d", "FusedLinear", "FusedBlock", "FusedStem"):
            bad.append(f"{name} (fused oneDNN op: export the plain model, load_model(..., "
                       "optimize=False))")
    from detection.modeling.fcos import FCOS
    from detection.modeling.retinanet import RetinaNet

    if not hasattr(model, "roi_heads") and not isinstance(model, (RetinaNet, FCOS)):
        bad.append(f"the model ({type(model).__name__}): export covers {COVERED}")
    elif getattr(model, "sem_seg_head", None) is not None:
        bad.append(f"sem_seg_head (the model, {type(model).__name__}, returns semantic and "
                   f"panoptic segmentations, which have no graph output; export covers "
                   f"{COVERED})")
    return bad


def _output_names(model: nn.Module) -> List[str]:
    """The graph's outputs for ``model``: boxes, scores, labels, and the masks and keypoints
    of the heads it has."""
    names = ["boxes", "scores", "labels"]
    roi_heads = getattr(model, "roi_heads", None)
    if getattr(roi_heads, "mask_head", None) is not None:
        names.append("masks")
    if getattr(roi_heads, "keypoint_head", None) is not None:
        names += ["keypoints", "keypoints_scores"]
    return names


def sample_image(height: int, width: int, seed: int = 0) -> Tensor:
    """A textured ``(3, H, W)`` 0-255 float image to trace and check with."""
    from detection.modeling.calibration import textured_image

    return textured_image(height, width, generator=torch.Generator().manual_seed(seed))


def _trace(graph: SingleImageGraph, image: Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings for sizes that are model constants
        return torch.jit.trace(graph, (image,), check_trace=False)


def write_graph(graph: nn.Module, args: Tuple[Tensor, ...], path: Path, fmt: str, *,
                input_names: List[str], output_names: List[str],
                dynamic_axes: Dict[str, Dict[int, str]]) -> None:
    """Trace ``graph`` on ``args`` into an ONNX file, or (``fmt`` "openvino") an OpenVINO IR
    converted from it, at ``path``."""
    if fmt == "openvino":
        from .runtimes import require

        ov = require("openvino")
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            write_graph(graph, args, onnx_path, "onnx", input_names=input_names,
                        output_names=output_names, dynamic_axes=dynamic_axes)
            ov_model = ov.convert_model(str(onnx_path))
            # Weights stay float32 (save_model would store them as fp16 by default).
            ov.save_model(ov_model, str(path), compress_to_fp16=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, do_constant_folding=True)


def _write_whole(graph: SingleImageGraph, image: Tensor, path: Path, fmt: str,
                 outputs: List[str]) -> None:
    axes = {"image": {1: "height", 2: "width"}}
    axes.update({name: {0: "detections"} for name in outputs})
    if "masks" in outputs:
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    write_graph(graph, (image,), path, fmt, input_names=["image"], output_names=outputs,
                dynamic_axes=axes)


@torch.no_grad()
def export_model(model: nn.Module, output_dir: Path, fmt: str, *,
                 trace_size: Tuple[int, int] = (480, 640),
                 source: Optional[Dict[str, str]] = None,
                 split: Optional[bool] = None) -> ExportInfo:
    """Write ``model`` (eval mode, plain, float32) in ``fmt`` into ``output_dir``, with its
    ``export.json``; returns the info written (without the check: see ``check_export``).

    ``split`` (default: for OpenVINO IR) also writes the model as three graphs, preprocess,
    backbone and heads (``split.py``): the OpenVINO runtime's bf16 mode runs the backbone in
    bf16 and the others in float32."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    bad = unsupported_parts(model, fmt)
    if bad:
        raise UnsupportedExportError(f"cannot export to {fmt}: " + "; ".join(bad))
    model = model.eval().float()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs = _output_names(model)
    graph = SingleImageGraph(model).eval()
    image = sample_image(*trace_size)
    path = output_dir / MODEL_FILES[fmt]
    if fmt in ("onnx", "openvino"):
        _write_whole(graph, image, path, fmt, outputs)
    else:
        _trace(graph, image).save(str(path))
    if split is None:
        split = fmt == "openvino"
    parts: Dict[str, Any] = {}
    if split:
        if fmt not in SPLIT_FORMATS:
            raise ValueError(f"a split export (preprocess, backbone and heads graphs) is "
                             f"written for {', '.join(SPLIT_FORMATS)}, not {fmt}")
        from .split import write_split

        parts = write_split(model, image, output_dir, fmt, outputs)
    meta = model.metadata
    info = ExportInfo(format=fmt, model_file=path.name, outputs=outputs,
                      class_names=list(meta.class_names),
                      category_ids=[int(i) for i in meta.category_ids],
                      mask_threshold=float(getattr(model, "mask_threshold", 0.5)),
                      source=dict(source or {}), parts=parts)
    info.save(output_dir)
    return info


@torch.no_grad()
def check_export(model: nn.Module, output_dir: Path, *,
                 sizes: Tuple[Tuple[int, int], ...] = ((480, 640), (427, 301))
                 ) -> Dict[str, Any]:
    """Run the export in ``output_dir`` on sample images of ``sizes`` (the traced size and
    another) and compare it with ``model`` in eager mode; store the agreement in its
    ``export.json`` and return it."""
    from .agreement import compare_detections
    from .runtimes import load_exported

    output_dir = Path(output_dir)
    deployed = load_exported(output_dir)
    model = model.eval()
    per_image = []
    for i, (h, w) in enumerate(sizes):
        image = sample_image(h, w, seed=i + 1)
        agreement = compare_detections(model([image])[0], deployed([image])[0])
        per_image.append({"size": [h, w], "agreement": str(agreement),
                          "fraction": agreement.fraction, "reference": agreement.reference,
                          "max_box_diff": agreement.max_box_diff,
                          "max_score_diff": agreement.max_score_diff,
                          "max_mask_diff": agreement.max_mask_diff,
                          "max_keypoint_diff": agreement.max_keypoint_diff,
                          "max_keypoint_score_diff": agreement.max_keypoint_score_diff})
    check = {"runtime": deployed.runtime, "images": per_image,
             "fraction": min(r["fraction"] for r in per_image)}
    info = ExportInfo.load(output_dir)
    info.check = check
    info.save(output_dir)
    return check
