"""Running an exported detector in ONNX Runtime, OpenVINO or TorchScript behind the eager
model's interface: ``model(images)`` returns per image the same dict (``boxes``, ``scores``,
``labels``, and ``masks`` / ``binary_masks`` for Mask R-CNN), so ``predict``, the demo,
evaluation and the submission tool run unchanged on any runtime."""

import importlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from detection.modeling.metadata import Metadata

from .export import ExportInfo

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
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

    In bf16 the plugin runs the convolutions, fully connected layers, RoIAlign and the input
    resize in bf16 and keeps the "graph tail" (every node after the last convolution or
    fully connected layer on the way to an output) in float32: box decoding, the score
    softmax, top-k, NMS, the rescaling of boxes and the pasting of masks (checked on the
    compiled model's runtime precisions, see ``runtime_precisions``)."""

    def __init__(self, directory: Path, info: ExportInfo, *, precision: str = "fp32",
                 threads: int = 0) -> None:
        super().__init__(info, "openvino", precision)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        ov = require("openvino")
        core = ov.Core()
        config: Dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
        }
        self.compiled = core.compile_model(str(directory / info.model_file), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def runtime_precisions(self) -> Dict[str, Dict[str, int]]:
        """Per layer type of the compiled graph, how many of its nodes run in each
        precision."""
        counts: Dict[str, Dict[str, int]] = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            kind, prec = rt["layerType"].astype(str), rt["runtimePrecision"].astype(str)
            counts.setdefault(kind, {}).setdefault(prec, 0)
            counts[kind][prec] += 1
        return counts

    def _run(self, image: np.ndarray) -> List[np.ndarray]:
        self.request.infer({0: image})
        return [self.request.get_output_tensor(i).data.copy()
                for i in range(len(self.info.outputs))]


class TorchScriptModel(DeployedModel):
    def __init__(self, directory: Path, info: ExportInfo) -> None:
        super().__init__(info, "torchscript", "fp32")
        self.module = torch.jit.load(str(directory / info.model_file), map_location="cpu")
        self.module.eval()

    def _run(self, image: np.ndarray) -> List[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for t in self.module(torch.from_numpy(image))]


def load_exported(directory: Path, runtime: Optional[str] = None, *,
                  precision: str = "fp32", threads: int = 0) -> DeployedModel:
    """The model exported into ``directory``, in ``runtime`` (default: the one its format
    is for: ONNX -> onnxruntime, OpenVINO IR -> openvino, TorchScript -> torch). ONNX files
    also run in OpenVINO."""
    directory = Path(directory)
    info = ExportInfo.load(directory)
    fmt = info.format
    runtime = runtime or {"onnx": "onnxruntime", "openvino": "openvino",
                          "torchscript": "torch"}[fmt]
    if runtime == "onnxruntime" and fmt == "onnx":
        if precision != "fp32":
            raise ValueError("the onnxruntime runtime runs float32 only; bf16 is for the torch "
                             "and openvino runtimes")
        return OnnxRuntimeModel(directory, info, threads=threads)
    if runtime == "openvino" and fmt in ("onnx", "openvino"):
        return OpenVINOModel(directory, info, precision=precision, threads=threads)
    if runtime == "torch" and fmt == "torchscript":
        return TorchScriptModel(directory, info)
    raise ValueError(f"{directory} holds a {fmt} export, which the {runtime!r} runtime does "
                     "not run (onnx: onnxruntime or openvino; openvino: openvino; "
                     "torchscript: torch)")
