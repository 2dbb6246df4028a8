"""Running an exported detector in ONNX Runtime, OpenVINO or TorchScript behind the eager
model's interface: ``model(images)`` returns per image the same dict (``boxes``, ``scores``,
``labels``, ``masks`` / ``binary_masks`` for Mask R-CNN, ``keypoints`` / ``keypoints_scores``
for Keypoint R-CNN: the export's outputs, ``ExportInfo.outputs``), so ``predict``, the demo,
evaluation and the submission tool run unchanged on any runtime."""

import importlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from backbones.machine import require_precision
from detection.modeling.metadata import Metadata

from .export import ExportInfo

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
# runtime -> (module to import, pip package that provides it)
PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino"),
            "onnx": ("onnx", "onnx")}


def require(runtime: str) -> Any:
    """Import the package a runtime needs, or raise an ImportError that names what to
    install."""
    module, package = PACKAGES[runtime]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the {runtime} runtime needs the '{package}' package: "
                          f"pip install {package}  (or pip install -e \".[deploy]\")") from e


class DeployedModel:
    """Base of the exported-model runtimes: the eager detector's call convention in eval
    mode. Subclasses implement ``_run(image) -> list of arrays`` in ``info.outputs`` order."""

    training = False

    def __init__(self, info: ExportInfo, runtime: str, precision: str) -> None:
        self.info, self.runtime, self.precision = info, runtime, precision
        logger.info("Inference in %s, precision %s", runtime, precision)
        self.metadata = Metadata(class_names=list(info.class_names),
                                 category_ids=list(info.category_ids))
        self.mask_threshold = info.mask_threshold
        self.device = torch.device("cpu")

    def eval(self) -> "DeployedModel":
        return self

    def train(self, mode: bool = True) -> "DeployedModel":
        if mode:
            raise RuntimeError(f"a model running in {self.runtime} is for inference only")
        return self

    def _run(self, image: np.ndarray) -> List[np.ndarray]:
        raise NotImplementedError

    def __call__(self, images: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
        from detection.modeling.preprocess import check_images

        check_images(images)
        results = []
        for img in images:
            x = np.ascontiguousarray(img.detach().cpu().to(torch.float32).numpy())
            arrays = self._run(x)
            out = {name: torch.from_numpy(np.asarray(a)) for name, a in
                   zip(self.info.outputs, arrays)}
            out["labels"] = out["labels"].to(torch.int64)
            if "masks" in out:
                out["binary_masks"] = out["masks"][:, 0] >= self.mask_threshold
            results.append(out)
        return results

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.info.model_file}, runtime={self.runtime}, "
                f"precision={self.precision})")


class OnnxRuntimeModel(DeployedModel):
    def __init__(self, directory: Path, info: ExportInfo, *, threads: int = 0) -> None:
        super().__init__(info, "onnxruntime", "fp32")
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(directory / info.model_file), opts,
                                            providers=["CPUExecutionProvider"])

    def _run(self, image: np.ndarray) -> List[np.ndarray]:
        return self.session.run(None, {"image": image})


class OpenVINOModel(DeployedModel):
    """OpenVINO's CPU plugin, float32 (``INFERENCE_PRECISION_HINT f32``) or bf16.

    bf16 runs an export's split graphs (``split.py``): the backbone graph (ResNet and FPN)
    compiled in bf16, the preprocessing graph (normalize, resize, pad) and the heads graph
    (RPN, RoI heads, box decoding, softmax, NMS, rescaling, masks) in float32 -- the
    arrangement of the torch runtime's bf16 mode. On an export without the split graphs (an
    ONNX file exported without ``split``), bf16 is OpenVINO's own: every convolution and
    fully connected layer in bf16, only the graph tail after the last of them in float32; it
    loses detections (86-87% kept on the trained shapes default), and a warning says so.
    int8 runs the split graphs with the backbone quantized by ``quantize.py``
    (``backbone_int8``), the preprocessing and heads in float32; it needs an export made with
    ``tools/export_model.py --precision int8``. ``arrangement`` names which one runs."""

    def __init__(self, directory: Path, info: ExportInfo, *, precision: str = "fp32",
                 threads: int = 0, split: Optional[bool] = None) -> None:
        if precision != "int8":
            precision = require_precision(precision, what="OpenVINO")  # "auto" resolved
        elif "backbone_int8" not in info.parts:
            raise ValueError(f"{directory} has no int8 backbone: export it with "
                             "tools/export_model.py --format openvino --precision int8")
        super().__init__(info, "openvino", precision)
        ov = require("openvino")
        core = ov.Core()

        def compile_(file: str, hint: str) -> Any:
            config: Dict[str, Any] = {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": hint,
            }
            return core.compile_model(str(directory / file), "CPU", config)

        self.stages: List[Any] = []
        if split and not info.parts:
            raise ValueError(f"{directory} has no split graphs (export with --format "
                             "openvino, or --split)")
        if info.parts and (split or (split is None and precision in ("bf16", "int8"))):
            hint = "bf16" if precision == "bf16" else "f32"
            backbone = info.parts["backbone_int8" if precision == "int8" else "backbone"]
            self.arrangement = (f"split: backbone {precision if precision == 'int8' else hint}"
                                ", preprocess and heads f32")
            self.stages = [compile_(info.parts["preprocess"], "f32"),
                           compile_(backbone, hint),
                           compile_(info.parts["heads"], "f32")]
            self._requests = [c.create_infer_request() for c in self.stages]
            return
        if precision == "bf16":
            self.arrangement = "openvino default bf16"
            logger.warning(
                "%s has no split graphs (export with --format openvino, or split=True):"
                " OpenVINO's own bf16 runs the heads in bf16 too and loses detections",
                directory)
        else:
            self.arrangement = "f32"
        self.stages = [compile_(info.model_file, "f32" if precision == "fp32" else "bf16")]
        self._requests = [self.stages[0].create_infer_request()]

    def stage_precisions(self) -> List[Dict[str, Dict[str, int]]]:
        """Per compiled graph (preprocess, backbone, heads for a split model), per layer
        type, how many of its nodes run in each precision."""
        out = []
        for compiled in self.stages:
            counts: Dict[str, Dict[str, int]] = {}
            for op in compiled.get_runtime_model().get_ordered_ops():
                rt = op.get_rt_info()
                kind, prec = rt["layerType"].astype(str), rt["runtimePrecision"].astype(str)
                counts.setdefault(kind, {}).setdefault(prec, 0)
                counts[kind][prec] += 1
            out.append(counts)
        return out

    def runtime_precisions(self) -> Dict[str, Dict[str, int]]:
        """``stage_precisions`` summed over the graphs."""
        total: Dict[str, Dict[str, int]] = {}
        for counts in self.stage_precisions():
            for kind, precs in counts.items():
                for prec, n in precs.items():
                    total.setdefault(kind, {}).setdefault(prec, 0)
                    total[kind][prec] += n
        return total

    def _run(self, image: np.ndarray) -> List[np.ndarray]:
        n = len(self.info.outputs)
        if len(self.stages) == 3:
            ov = require("openvino")
            pre, backbone, heads = self._requests
            image_tensor = ov.Tensor(image, shared_memory=True)
            pre.infer({0: image_tensor})
            backbone.set_input_tensor(0, pre.get_output_tensor(1))
            backbone.infer()
            heads.set_input_tensor(0, image_tensor)
            heads.set_input_tensor(1, pre.get_output_tensor(0))
            for i in range(len(self.info.parts["features"])):
                heads.set_input_tensor(i + 2, backbone.get_output_tensor(i))
            heads.infer()
            return [heads.get_output_tensor(i).data.copy() for i in range(n)]
        request = self._requests[0]
        request.infer({0: image})
        return [request.get_output_tensor(i).data.copy() for i in range(n)]


class TorchScriptModel(DeployedModel):
    def __init__(self, directory: Path, info: ExportInfo) -> None:
        super().__init__(info, "torchscript", "fp32")
        self.module = torch.jit.load(str(directory / info.model_file), map_location="cpu")
        self.module.eval()

    def _run(self, image: np.ndarray) -> List[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for t in self.module(torch.from_numpy(image))]


def load_exported(directory: Path, runtime: Optional[str] = None, *,
                  precision: str = "fp32", threads: int = 0,
                  split: Optional[bool] = None) -> DeployedModel:
    """The model exported into ``directory``, in ``runtime`` (default: the one its format
    is for: ONNX -> onnxruntime, OpenVINO IR -> openvino, TorchScript -> torch). ONNX files
    also run in OpenVINO. ``split`` (OpenVINO): run the preprocess, backbone and heads
    graphs (default: for bf16, where the export has them); ``False`` runs the whole graph,
    in bf16 in OpenVINO's own arrangement (for comparison). ``precision`` "auto" is bf16 in
    OpenVINO on a CPU with native bf16, float32 elsewhere; "bf16" on a CPU without it raises
    ``backbones.machine.PrecisionUnavailable``."""
    directory = Path(directory)
    info = ExportInfo.load(directory)
    fmt = info.format
    runtime = runtime or {"onnx": "onnxruntime", "openvino": "openvino",
                          "torchscript": "torch"}[fmt]
    if runtime == "onnxruntime" and fmt == "onnx":
        if precision not in ("fp32", "auto"):
            raise ValueError("the onnxruntime runtime runs float32 only; bf16 is for the torch "
                             "and openvino runtimes, int8 for openvino")
        return OnnxRuntimeModel(directory, info, threads=threads)
    if runtime == "openvino" and fmt in ("onnx", "openvino"):
        return OpenVINOModel(directory, info, precision=precision, threads=threads,
                             split=split)
    if runtime == "torch" and fmt == "torchscript":
        if precision not in ("fp32", "auto"):
            raise ValueError("a TorchScript export runs in the precision it was exported in "
                             "(float32)")
        return TorchScriptModel(directory, info)
    raise ValueError(f"{directory} holds a {fmt} export, which the {runtime!r} runtime does "
                     "not run (onnx: onnxruntime or openvino; openvino: openvino; "
                     "torchscript: torch)")
