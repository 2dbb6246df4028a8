"""What a ``weights`` argument names: a registered name, a URL or a local file, and the spec
(normalization, stride layout, architecture) that goes with it."""

import difflib
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..archs import ARCHS
from ..convert import convert_to_ours, detect_format
from .checkpoint import read_checkpoint, select_body
from .download import cache_file_name, cache_root
from .registry import MSRA_MEAN_BGR, MSRA_STD_BGR, WEIGHTS, WeightsSpec, list_weights


class UnknownWeightsError(KeyError, ValueError):
    """A weights name that is not registered, not a URL and not an existing file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def is_url(weights: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", weights) is not None


def unknown_name(weights: str) -> Exception:
    names = list_weights()
    close = difflib.get_close_matches(weights, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    looks_like_path = weights.endswith((".pth", ".pt", ".pkl", ".safetensors", ".bin")) or (
        os.sep in weights and not re.fullmatch(r"[\w-]+/[\w.-]+", weights)
    )
    if looks_like_path:
        return FileNotFoundError(
            f"no weights file at {os.path.abspath(weights)!r}, and {weights!r} is neither a "
            f"registered weights name nor a URL.{hint} Registered names: {', '.join(names)}"
        )
    return UnknownWeightsError(
        f"unknown weights {weights!r} (not a registered name, a URL or an existing file).{hint} "
        f"Registered names: {', '.join(names)}"
    )


def resolve_weights(weights: str, arch: Optional[str] = None) -> Optional[WeightsSpec]:
    """The spec of ``weights``: a registered name, a URL or a local path.

    A name gives its registered spec (ValueError when ``arch`` is given and differs). A URL
    gives the registered spec with that URL, or one inferred from the cached file if present.
    A local file gives a spec inferred from its keys when the naming tells the normalization
    (MSRA Caffe2 names: caffe style, BGR, std 1; torchvision/timm names: RGB, ImageNet
    mean/std), else None. Anything else raises an error listing the registered names.
    """
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a name, URL or path, got {type(weights).__name__}")
    weights = os.fspath(weights)
    spec = WEIGHTS.get(weights)
    if spec is None and is_url(weights):
        spec = next((s for s in WEIGHTS.values() if s.url == weights), None)
        if spec is None:
            cached = cache_root(None) / cache_file_name(weights)
            return _infer_spec(cached, weights, arch) if cached.is_file() else None
    if spec is not None:
        if arch is not None and spec.arch != arch:
            raise ValueError(
                f"weights {spec.name!r} are for {spec.arch}, but the model is {arch}; "
                f"weights for {arch}: {', '.join(list_weights(arch)) or 'none registered'}"
            )
        return spec
    if os.path.isfile(weights):
        return _infer_spec(Path(weights), weights, arch)
    raise unknown_name(weights)


def _infer_spec(path: Path, name: str, arch: Optional[str]) -> Optional[WeightsSpec]:
    """A spec for an unregistered file, from its parameter names; None when they do not
    tell the normalization it was trained with."""
    state_dict, meta = read_checkpoint(path)
    state_dict, _ = select_body(state_dict)
    try:
        fmt = detect_format(state_dict)
    except ValueError:
        return None
    converted, _ = convert_to_ours(state_dict, fmt)
    guessed = guess_arch(converted) or arch or "unknown"
    fc = converted.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None else 0
    url = path.resolve().as_uri() if not is_url(name) else name
    author = str(meta.get("__author__", "")).lower()
    if fmt == "caffe2" or (fmt == "detectron2" and author in ("caffe2", "msra")):
        return WeightsSpec(
            name=name, arch=guessed, url=url, sha256=None, source="detectron2",
            input_format="BGR", pixel_mean=MSRA_MEAN_BGR, pixel_std=MSRA_STD_BGR,
            style="caffe", num_classes=num_classes,
        )
    if fmt in ("torchvision", "timm") or (fmt == "detectron2" and author == "torchvision"):
        return WeightsSpec(
            name=name, arch=guessed, url=url, sha256=None,
            source="detectron2" if fmt == "detectron2" else fmt, num_classes=num_classes,
        )
    return None


def guess_arch(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The entry of ``backbones.archs.ARCHS`` whose block counts, widths, stem and shortcut
    match a state dict in our naming, or None."""
    counts = []
    for stage in ("res2", "res3", "res4", "res5"):
        indices = {int(m.group(1)) for k in state_dict
                   for m in [re.match(rf"{stage}\.(\d+)\.", k)] if m}
        counts.append(max(indices) + 1 if indices else 0)
    block = "bottleneck" if "res2.0.conv3.weight" in state_dict else "basic"
    groups, width = 1, 64
    conv2 = state_dict.get("res2.0.conv2.weight")
    if block == "bottleneck" and conv2 is not None and conv2.dim() == 4:
        width, groups = int(conv2.shape[1]), int(conv2.shape[0]) // int(conv2.shape[1])
    stem = "deep" if "stem.conv3.weight" in state_dict else "classic"
    avg_down = any(re.match(r"res\d\.0\.downsample\.2\.", k) for k in state_dict)
    for name, a in ARCHS.items():
        if (a.block, a.layers, a.groups, a.width_per_group, a.stem, a.avg_down) == (
                block, tuple(counts), groups, width, stem, avg_down):
            return name
    return None
