"""Exports made on demand by ``load_model(..., runtime=...)``, kept in a cache folder so that
a model is traced once per config and weights file."""

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .export import ExportInfo, check_export, export_model
from .runtimes import DeployedModel, load_exported

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$DETKIT_CACHE/exported`` (default ``~/.cache/detkit/exported``)."""
    base = os.environ.get("DETKIT_CACHE") or Path.home() / ".cache" / "detkit"
    return Path(base) / "exported"


def _weights_identity(weights: Optional[str]) -> str:
    if not weights:
        return "random"
    path = Path(weights)
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return weights  # a zoo name or URL: its content is fixed by its hash


def export_cached(model: nn.Module, cfg: Any, weights: Optional[str], *, runtime: str,
                  precision: str = "fp32") -> DeployedModel:
    """``model`` exported to ONNX (into the cache, unless an export of the same config and
    weights is there) and loaded in ``runtime``."""
    key = hashlib.sha256(f"{cfg.dump()}\n{_weights_identity(weights)}".encode())
    directory = cache_root() / key.hexdigest()[:20]
    try:
        if "preprocess" not in ExportInfo.load(directory).parts:  # cached before the split
            raise FileNotFoundError(directory)
    except (FileNotFoundError, TypeError, ValueError):
        logger.info("Exporting the model to ONNX in %s", directory)
        # The split graphs too: OpenVINO's bf16 runs the backbone in bf16, the rest in f32.
        export_model(model, directory, "onnx", source={"weights": weights or ""},
                     split=True)
        check = check_export(model, directory)
        logger.info("Export check (onnxruntime against eager): %s",
                    "; ".join(r["agreement"] for r in check["images"]))
    return load_exported(directory, runtime, precision=precision)
