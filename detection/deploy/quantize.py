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
kept in float32 did not do better. ``load_exported(DIR, "openvino",
precision="int8")`` runs it. int8 runs on any x86 CPU; VNNI (avx512_vnni, avx_vnni) or AMX
make its dot products fast (``backbones.machine``).
"""

import logging
import time
from pathlib import Path
from typing import Any, Iterable, List, Sequence, Union

import numpy as np
import torch

from .export import ExportInfo

logger = logging.getLogger(__name__)

INT8_BACKBONE = "backbone_int8.xml"
KEEP_FLOAT = (r".*/stem/.*", r".*/res2/.*")  # node name patterns left in float32


def require_nncf():
    try:
        import nncf
    except ImportError as e:
        raise ImportError("int8 quantization needs the 'nncf' package: pip install nncf "
                          "(or pip install -e \".[deploy]\")") from e
    return nncf


def calibration_images(cfg: Any, count: int) -> List[torch.Tensor]:
    """``count`` images of ``cfg.DATASETS.TRAIN``, spread evenly over it (RGB ``(3, H, W)``
    uint8), to calibrate int8 on."""
    from detection.data.build import get_dataset_records
    from detection.data.image_io import read_image

    if not cfg.DATASETS.TRAIN:
        raise ValueError("int8 calibrates on DATASETS.TRAIN, which is empty")
    records = get_dataset_records(cfg.DATASETS.TRAIN, filter_empty=False)
    step = max(1, len(records) // max(count, 1))
    return [torch.from_numpy(read_image(r["file_name"])).permute(2, 0, 1)
            for r in records[::step][:count]]


def quantize_export(directory: Union[str, Path], images: Iterable[torch.Tensor], *,
                    keep_float: Sequence[str] = KEEP_FLOAT) -> Path:
    """Quantize the backbone graph of the split export in ``directory`` to int8, calibrated
    on ``images`` (RGB ``(3, H, W)``, 0-255; a few hundred of the training set), and record
    it in ``export.json`` (``parts["backbone_int8"]``). ``keep_float``: regular expressions
    of node names left in float32 (a backbone of other names keeps nothing). Returns the
    quantized graph's path."""
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
    quantized = nncf.quantize(
        backbone, nncf.Dataset(batches), subset_size=len(batches), fast_bias_correction=False,
        ignored_scope=nncf.IgnoredScope(patterns=list(keep_float), validate=False))
    target = directory / INT8_BACKBONE
    ov.save_model(quantized, str(target))
    info.parts["backbone_int8"] = INT8_BACKBONE
    info.parts["int8_calibration_images"] = len(batches)
    info.save(directory)
    logger.info("int8 backbone calibrated on %d images in %.1f s: %s", len(batches),
                time.perf_counter() - t0, target)
    return target
