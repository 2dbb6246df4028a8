"""Pretrained weights: a registry of named checkpoints, a download cache, checkpoint reading
that never runs code from a file, and a loader that converts names and reports what it did::

    from backbones import list_weights, resnet50
    list_weights("resnet50")            # ['detectron2/R-50', 'timm/resnet50.a1_in1k', ...]
    body = resnet50(weights="detectron2/R-50")     # caffe style, BGR, std 1
    WEIGHTS["detectron2/R-50"].pixel_mean         # (103.53, 116.28, 123.675), BGR

    registry.py     WeightsSpec and the named checkpoints (WEIGHTS, list_weights)
    download.py     torch.hub cache, sha256 check, the offline error
    checkpoint.py   read_checkpoint (.pth, .pkl, .safetensors) and a detector's body
    resolve.py      a name, URL or path -> its spec; guess_arch
    load.py         load_pretrained and its LoadReport
"""

from .checkpoint import read_checkpoint, select_body
from .download import (
    ChecksumError,
    WeightsUnavailableError,
    cache_file_name,
    download_weights,
    sha256_of_file,
)
from .load import LoadReport, load_pretrained
from .registry import (
    MSRA_MEAN_BGR,
    MSRA_STD_BGR,
    SOURCES,
    WEIGHTS,
    WeightsSpec,
    list_weights,
)
from .resolve import UnknownWeightsError, guess_arch, resolve_weights

__all__ = [
    "ChecksumError", "LoadReport", "MSRA_MEAN_BGR", "MSRA_STD_BGR", "SOURCES",
    "UnknownWeightsError", "WEIGHTS", "WeightsSpec", "WeightsUnavailableError",
    "cache_file_name", "download_weights", "guess_arch", "list_weights", "load_pretrained",
    "read_checkpoint", "resolve_weights", "select_body", "sha256_of_file",
]
