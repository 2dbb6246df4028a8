"""Every CPU runtime a user would pick, on the same weights and image, in one process:
torchvision eager, torchvision's model exported to ONNX Runtime and OpenVINO, and ours in
torch (fp32, bf16), ONNX Runtime and OpenVINO (fp32, bf16, int8). Rows the CPU cannot run (bf16
without native bf16, int8 without NNCF) are listed as skipped, with the reason.

    python benchmarks/bench_runtimes.py [--model faster|mask] [--runs 5] [--threads 2]
                                        [--heap both|default|retain]

Weights: torchvision's R50-FPN with random weights, calibrated BatchNorm statistics and heads
lively enough that detections pass the 0.05 score threshold (at threshold 0 NMS over ~90k
boxes would dominate every runtime); ours converted from them. One 800x1067 image. The rows
run round-robin, one call each per round, and the table gives the median seconds, the ratio
to torchvision eager, CPU time over wall time, and each row's agreement with torchvision
eager: the share of its detections reproduced with the same label, IoU > 0.99 and score within
1e-3 ("strict"), and with IoU > 0.95 and score within 0.02 (the bf16 bar).

``--heap both`` (the default) times every row twice in the same process: first with glibc's
malloc as it comes (a fresh mmap, page-faulted again, for every tensor above 32 MB), then with
``backbones.cpu_memory.retain_freed_memory()`` in effect, as the inference tools run. The
setting is the process's, so it applies to every row, torchvision's included.
"""

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_faster_rcnn import image, lively_reference  # noqa: E402
from common import timing_args  # noqa: E402

from backbones.cpu_memory import retain_freed_memory  # noqa: E402
from backbones.machine import PrecisionUnavailable  # noqa: E402
from detection.deploy import export_model, load_exported  # noqa: E402
from detection.deploy.agreement import compare_detections  # noqa: E402
from detection.deploy.runtimes import require  # noqa: E402
from detection.optimize import optimize_for_inference  # noqa: E402


class TorchvisionGraph(torch.nn.Module):
    """torchvision's detector on one 0-255 image, returning a tuple (for export)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, img: torch.Tensor):
        out = self.model([img / 255])[0]
        keys = ("boxes", "scores", "labels", "masks") if "masks" in out else \
            ("boxes", "scores", "labels")
        return tuple(out[k] for k in keys)


def torchvision_onnx(ref: torch.nn.Module, img: torch.Tensor, path: Path, masks: bool) -> None:
    names = ["boxes", "scores", "labels"] + (["masks"] if masks else [])
    axes = {"image": {1: "h", 2: "w"}, **{n: {0: "n"} for n in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TorchvisionGraph(ref).eval(), (img,), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=names,
                          dynamic_axes=axes)


class Session:
    """An ONNX file run in ONNX Runtime or OpenVINO, returning the result dict."""

    def __init__(self, path: Path, runtime: str, names, precision: str = "f32",
                 threads: int = 0) -> None:
        self.names, threads = names, threads or torch.get_num_threads()
        if runtime == "onnxruntime":
            ort = require("onnxruntime")
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.run = lambda x: sess.run(None, {"image": x})
        else:
            ov = require("openvino")
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
            if precision:  # None: OpenVINO's own default (bf16 on CPUs that have it)
                config["INFERENCE_PRECISION_HINT"] = precision
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            request = compiled.create_infer_request()

            def run(x):
                request.infer({0: x})
                return [request.get_output_tensor(i).data.copy() for i in range(len(names))]

            self.run = run

    def __call__(self, images):
        arrays = self.run(np.ascontiguousarray(images[0].numpy()))
        return [{n: torch.from_numpy(np.asarray(a)) for n, a in zip(self.names, arrays)}]


def build(kind: str, img: torch.Tensor):
    """(torchvision reference, our plain model) with the same weights."""
    if kind == "mask":
        from bench_mask_rcnn import lively_mask_reference
        from bench_mask_rcnn import ours_from as mask_from

        ref = lively_mask_reference(img)
        return ref, mask_from(ref)
    from bench_faster_rcnn import ours_from
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    ref = lively_reference(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval(),
                           img)
    return ref, ours_from(ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("faster", "mask"), default="faster")
    parser.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    parser.add_argument("--heap", choices=("both", "default", "retain"), default="both",
                        help="glibc malloc as it comes, with freed memory retained, or both")
    args = timing_args(parser)
    torch.manual_seed(0)
    img = image()
    ref, plain = build(args.model, img)
    masks = args.model == "mask"
    names = ["boxes", "scores", "labels"] + (["masks"] if masks else [])
    tmp = Path(tempfile.mkdtemp(prefix="bench_runtimes_"))
    print(f"exporting into {tmp} ...", flush=True)
    torchvision_onnx(ref, img, tmp / "torchvision.onnx", masks)
    export_model(plain, tmp / "ours", "onnx", split=True)

    def ours(precision: str, **options):
        import copy

        return optimize_for_inference(copy.deepcopy(plain), precision=precision, **options)

    # name -> (a function making the row's model, whether it is torchvision eager)
    makers = {
        "torchvision eager": (lambda: (lambda: ref([img / 255])), 1),
        "torchvision -> ONNX Runtime":
            (lambda: Session(tmp / "torchvision.onnx", "onnxruntime", names), 0),
        "torchvision -> OpenVINO f32":
            (lambda: Session(tmp / "torchvision.onnx", "openvino", names), 0),
        "torchvision -> OpenVINO default precision (bf16 where native)":
            (lambda: Session(tmp / "torchvision.onnx", "openvino", names, precision=None), 0),
        "ours, torch fp32": (lambda: ours("fp32"), 0),
        "ours, torch fp32, direct convs (winograd=False)":
            (lambda: ours("fp32", winograd=False), 0),
        "ours, torch bf16": (lambda: ours("bf16"), 0),
        "ours -> ONNX Runtime": (lambda: load_exported(tmp / "ours", "onnxruntime"), 0),
        "ours -> OpenVINO f32": (lambda: load_exported(tmp / "ours", "openvino"), 0),
        "ours -> OpenVINO bf16 (backbone bf16, heads f32)":
            (lambda: load_exported(tmp / "ours", "openvino", precision="bf16"), 0),
        "ours -> OpenVINO default bf16 (whole graph)":
            (lambda: load_exported(tmp / "ours", "openvino", precision="bf16", split=False), 0),
        "ours -> OpenVINO int8 (backbone int8 by NNCF, heads f32)": (lambda: int8(), 0),
    }

    def int8():
        from detection.deploy.quantize import quantize_export
        from detection.modeling.calibration import textured_image

        calibration = [textured_image(800, 1067, generator=torch.Generator().manual_seed(s))
                       for s in range(1, 9)]  # random weights: calibrated for speed only
        quantize_export(tmp / "ours", calibration)
        return load_exported(tmp / "ours", "openvino", precision="int8")

    calls, skipped = {}, {}
    for name, (make, is_ref) in makers.items():
        if name in args.skip:
            continue
        try:
            model = make()
        except PrecisionUnavailable as e:  # bf16 rows on a CPU without native bf16
            skipped[name] = str(e).split(";")[0]
            continue
        except ImportError as e:  # the int8 row without NNCF
            skipped[name] = str(e)
            continue
        calls[name] = model if is_ref else (lambda m=model: m([img]))
    modes = ["default", "retain"] if args.heap == "both" else [args.heap]
    times = {}
    with torch.inference_mode():
        expected = ref([img / 255])[0]
        outputs = {name: fn()[0] for name, fn in calls.items()}  # also the warm-up
        for mode in modes:
            if mode == "retain":
                if not retain_freed_memory():
                    print("retain_freed_memory() has no effect here (not glibc): skipped")
                    continue
                for fn in calls.values():  # the heap grows to its peak once
                    fn()
            times[mode] = time_rows(calls, args.runs)
    print(f"\n{args.model} R-CNN R50-FPN, 800x1067, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.runs} round-robin runs; "
          f"torchvision eager finds {expected['boxes'].shape[0]} detections\n")
    heads = {"default": "glibc malloc as it comes", "retain": "freed memory retained"}
    print("| runtime | " + " | ".join(f"median s ({heads[m]}) | ratio | CPU/wall"
                                      for m in times) + " | agreement strict | "
          "agreement bf16 bar |")
    print("|---|" + "---|---|---|" * len(times) + "---|---|")
    for name in calls:
        cells = []
        for wall, cpu in times.values():
            t, t_ref = statistics.median(wall[name]), statistics.median(wall["torchvision eager"])
            ratio_cpu = statistics.median(c / w for c, w in zip(cpu[name], wall[name]))
            cells.append(f"{t:.3f} | {t / t_ref:.2f} | {ratio_cpu:.2f}")
        offset = 0 if name.startswith("torchvision") else 1
        strict = compare_detections(expected, outputs[name], label_offset=offset)
        loose = compare_detections(expected, outputs[name], label_offset=offset, iou=0.95,
                                   score_tol=0.02)
        print(f"| {name} | {' | '.join(cells)} | {strict.fraction:.1%} | {loose.fraction:.1%} |")
    for name, reason in skipped.items():
        print(f"| {name} | skipped: {reason} |")


def time_rows(calls, runs):
    """(wall, cpu): per row name, the seconds of each of ``runs`` round-robin rounds."""
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu

if __name__ == "__main__":
    main()
