"""Deployment: export to ONNX, TorchScript and OpenVINO IR, and running the exports behind
the eager model's interface.

    python tools/export_model.py --config ... --weights ... --format onnx --output DIR
    model = load_model(DIR)                                  # or load_model(cfg, w, runtime=...)
"""

from backbones.machine import PRECISIONS

from .cache import export_cached
from .export import (
    FORMATS,
    ExportInfo,
    UnsupportedExportError,
    check_export,
    export_model,
)
from .runtimes import RUNTIMES, DeployedModel, load_exported, require

__all__ = [
    "FORMATS", "PRECISIONS", "RUNTIMES", "DeployedModel", "ExportInfo",
    "UnsupportedExportError", "check_export", "export_cached", "export_model",
    "load_exported", "require",
]
