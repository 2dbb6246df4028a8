"""Everything a bug report needs about the environment, in one table:

    python -m backbones.collect_env

The machine (``backbones.machine``: CPU model and flags, GPUs, the precisions and kernels
that run here) and the versions of Python, torch, torchvision, the runtimes and the toolkit.
"""

import importlib.metadata
import platform
import sys
from typing import List, Tuple

import torch

from . import machine

PACKAGES = ("resnet-detkit", "torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval",
            "albumentations", "fvcore", "onnx", "onnxruntime", "openvino", "nncf", "timm")


def package_versions() -> List[Tuple[str, str]]:
    rows = []
    for name in PACKAGES:
        try:
            rows.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def collect_env() -> str:
    rows = [("Python", sys.version.split()[0]), ("platform", platform.platform()),
            *package_versions(),
            ("torch built with", f"oneDNN {torch.backends.mkldnn.is_available()}, "
                                 f"CUDA {torch.version.cuda or 'no'}, "
                                 f"MKL {torch.backends.mkl.is_available()}"),
            ("torch threads", str(torch.get_num_threads()))]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return f"{table}\n{machine.report()}"


def main() -> int:
    print(collect_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
