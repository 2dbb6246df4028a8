"""Post-training int8 quantization of an exported detector's backbone, with NNCF for OpenVINO.

A split export (``split.py``) holds the detector as preprocess, backbone and heads graphs.
``quantize_export`` quantizes the backbone graph (ResNet res3-res5 and FPN: most of the
model's multiply-adds) to int8, calibrated on the batches the preprocess graph makes of a few
hundred training images, and writes it beside the others as ``backbone_int8.xml``. The stem
and res2 (``KEEP_FLOAT``), the preprocessing and the heads (RPN, RoI heads, box decoding,
scores, NMS) stay in float32: the arrangement of the bf16 mode, for CPUs without native bf16.
On the trained shapes default, int8 holds box AP but moves detections more than bf16 does
(docs/benchmarks.md): with the stem and res2 quantized too, 88% of float32's detections come
back at the bf16 bar instead of 92%; NNCF's fast bias correction, MIXED preset, or the FPN
kept in float32 did not do better. Given validation images, NNCF's accuracy control then
returns the layers that move the backbone's outputs most to float32 until the detections on
those images are kept at the bar (``AGREEMENT_BAR``, ``max_drop``). ``load_exported(DIR,
"openvino", precision="int8")`` runs it. int8 runs on any x86 CPU; VNNI (avx512_vnni,
avx_vnni) or AMX make its dot products fast (``backbones.machine``).
"""

import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .agreement import compare_detections
from .export import ExportInfo

logger = logging.getLogger(__name__)

INT8_BACKBONE = "backbone_int8.xml"
KEEP_FLOAT = (r".*/stem/.*", r".*/res2/.*")  # node name patterns left in float32
# A detection is kept when the candidate has one of the same label with IoU > 0.95 and a score
# within 0.02; float32 detections under 0.07 are left out (near the 0.05 score threshold they
# may fall under it)
AGREEMENT_BAR = {"iou": 0.95, "score_tol": 0.02, "min_score": 0.07}


def require_nncf():
    try:
        import nncf
    except ImportError as e:
        raise ImportError("int8 quantization needs the 'nncf' package: pip install nncf "
                          "(or pip install -e \".[deploy]\")") from e
    return nncf


def calibration_images(cfg: Any, count: int, *, validation: int = 0
                       ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``count`` images of ``cfg.DATASETS.TRAIN`` spread evenly over it to calibrate int8 on,
    and ``validation`` other images of it, spread over the rest, for the accuracy control
    (RGB ``(3, H, W)`` uint8)."""
    from detection.data.build import get_dataset_records
    from detection.data.image_io import read_image

    if not cfg.DATASETS.TRAIN:
        raise ValueError("int8 calibrates on DATASETS.TRAIN, which is empty")
    records = get_dataset_records(cfg.DATASETS.TRAIN, filter_empty=False)
    chosen = _spread(list(range(len(records))), count)
    rest = sorted(set(range(len(records))) - set(chosen))
    checked = _spread(rest, validation) if validation > 0 else []

    def load(indices: List[int]) -> List[torch.Tensor]:
        return [torch.from_numpy(read_image(records[i]["file_name"])).permute(2, 0, 1)
                for i in indices]

    return load(chosen), load(checked)


def _spread(indices: List[int], count: int) -> List[int]:
    step = max(1, len(indices) // max(count, 1))
    return indices[::step][:count]


def quantize_export(directory: Union[str, Path], images: Iterable[torch.Tensor], *,
                    keep_float: Sequence[str] = KEEP_FLOAT,
                    validation_images: Optional[Iterable[torch.Tensor]] = None,
                    max_drop: float = 0.01) -> Path:
    """Quantize the backbone graph of the split export in ``directory`` to int8, calibrated
    on ``images`` (RGB ``(3, H, W)``, 0-255; a few hundred of the training set), and record
    it in ``export.json`` (``parts["backbone_int8"]``). ``keep_float``: regular expressions
    of node names left in float32 (a backbone of other names keeps nothing).

    With ``validation_images``, NNCF's accuracy control then puts layers back into float32,
    those whose int8 moves the backbone's outputs most first, until at most ``max_drop`` of
    float32's detections on those images are lost at ``AGREEMENT_BAR``
    (``detections_kept``); the convolutions left in float32 are listed in
    ``parts["int8_float_convs"]``. Returns the quantized graph's path."""
    import openvino as ov

    nncf = require_nncf()
    logging.getLogger("nncf").setLevel(logging.WARNING)  # its per-node notes
    directory = Path(directory)
    info = ExportInfo.load(directory)
    if not info.parts:
        raise ValueError(f"{directory} has no split graphs to quantize: export with --format "
                         "openvino (or --split)")
    core = ov.Core()
    pre = core.compile_model(str(directory / info.parts["preprocess"]), "CPU",
                             {"INFERENCE_PRECISION_HINT": "f32"})
    t0 = time.perf_counter()
    batches: List[np.ndarray] = []
    for img in images:
        x = np.ascontiguousarray(img.detach().cpu().to(torch.float32).numpy())
        batches.append(pre({0: x})[pre.outputs[1]].copy())  # (1, 3, H, W), normalized
    if not batches:
        raise ValueError("int8 calibration needs at least one image")
    backbone = core.read_model(str(directory / info.parts["backbone"]))
    ignored = nncf.IgnoredScope(patterns=list(keep_float), validate=False)
    if validation_images is None:
        for key in ("int8_validation_images", "int8_detections_kept"):  # of an earlier run
            info.parts.pop(key, None)
        quantized = nncf.quantize(backbone, nncf.Dataset(batches), subset_size=len(batches),
                                  fast_bias_correction=False, ignored_scope=ignored)
    else:
        split = _SplitHeads(core, directory, info, pre)
        items = [split.prepare(img) for img in validation_images]
        if not items:
            raise ValueError("int8 accuracy control needs at least one validation image")
        reference = split.detections(
            core.compile_model(backbone, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), items)

        def validate(compiled: Any, indices: Iterable[int]) -> Tuple[float, None]:
            chosen = list(indices)
            got = split.detections(compiled, [items[i] for i in chosen])
            return detections_kept([reference[i] for i in chosen], got), None

        quantized = nncf.quantize_with_accuracy_control(
            backbone, nncf.Dataset(batches), nncf.Dataset(list(range(len(items))),
                                                          lambda i: items[i][2]),
            validate, max_drop=max_drop, subset_size=len(batches), fast_bias_correction=False,
            ignored_scope=ignored)
        got = split.detections(
            core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), items)
        info.parts["int8_validation_images"] = len(items)
        info.parts["int8_detections_kept"] = round(detections_kept(reference, got), 6)
    float_convs = _float_convolutions(quantized)
    target = directory / INT8_BACKBONE
    # float32 weights stay float32 (save_model's default compresses them to float16)
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    info.parts["backbone_int8"] = INT8_BACKBONE
    info.parts["int8_calibration_images"] = len(batches)
    info.parts["int8_float_convs"] = float_convs
    info.save(directory)
    logger.info("int8 backbone calibrated on %d images in %.1f s, %d convolutions left in "
                "float32%s: %s", len(batches), time.perf_counter() - t0, len(float_convs),
                f" (detections kept on {info.parts['int8_validation_images']} validation "
                f"images: {info.parts['int8_detections_kept']:.2%})"
                if validation_images is not None else "", target)
    return target


def detections_kept(reference: Sequence[Dict[str, torch.Tensor]],
                    candidate: Sequence[Dict[str, torch.Tensor]]) -> float:
    """The share of ``reference``'s detections, pooled over the images, that ``candidate``
    keeps at ``AGREEMENT_BAR``."""
    matched = total = 0
    for ref, got in zip(reference, candidate, strict=True):
        a = compare_detections(ref, got, **AGREEMENT_BAR)
        matched, total = matched + a.matched, total + a.reference
    return matched / total if total else 1.0


class _SplitHeads:
    """The float32 preprocessing and heads graphs of a split export, to run the detector
    around a candidate backbone (an OpenVINO compiled model)."""

    def __init__(self, core: Any, directory: Path, info: ExportInfo, pre: Any) -> None:
        self.pre, self.outputs = pre, list(info.outputs)
        self.features = len(info.parts["features"])
        self.heads = core.compile_model(str(directory / info.parts["heads"]), "CPU",
                                        {"INFERENCE_PRECISION_HINT": "f32"})

    def prepare(self, image: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The heads' first two inputs and the backbone's input for an RGB image."""
        x = np.ascontiguousarray(image.detach().cpu().to(torch.float32).numpy())
        out = self.pre({0: x})
        return x, out[self.pre.outputs[0]].copy(), out[self.pre.outputs[1]].copy()

    def detections(self, backbone: Any, items: Sequence[Tuple[np.ndarray, ...]]
                   ) -> List[Dict[str, torch.Tensor]]:
        results = []
        for image, sizes, batch in items:
            feats = backbone({0: batch})
            inputs = {0: image, 1: sizes}
            inputs.update({i + 2: feats[backbone.outputs[i]] for i in range(self.features)})
            out = self.heads(inputs)
            results.append({name: torch.from_numpy(np.asarray(out[o]).copy())
                            for name, o in zip(self.outputs, self.heads.outputs)})
        return results


def _float_convolutions(model: Any) -> List[str]:
    """Names of the convolutions of an NNCF-quantized OpenVINO model that run in float32:
    those whose input does not come through a FakeQuantize."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "Convolution"
            and op.input_value(0).get_node().get_type_name() != "FakeQuantize"]
