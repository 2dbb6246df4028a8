"""Loading weights into a ResNet: names converted, shapes checked, a report of what loaded."""

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..convert import StateDict, convert_to_ours
from .checkpoint import read_checkpoint, select_body
from .download import download_weights
from .registry import WEIGHTS, WeightsSpec
from .resolve import guess_arch, is_url, resolve_weights, unknown_name

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What ``load_pretrained`` did. ``unexpected_keys`` holds checkpoint keys the model has
    no place for (a classifier head loaded into a headless backbone lands here, harmlessly);
    ``missing_keys`` the model's keys the checkpoint lacks."""

    weights: str
    file: str
    format: str
    loaded: int
    missing_keys: List[str]
    unexpected_keys: List[str]
    dropped: int = 0

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.file} ({self.format} names)"
        if self.missing_keys:
            text += f"; missing: {_short(self.missing_keys)}"
        if self.unexpected_keys:
            text += f"; unexpected (unused): {_short(self.unexpected_keys)}"
        if self.dropped:
            text += f"; {self.dropped} non-backbone keys skipped"
        return text


def _short(keys: Sequence[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# Model keys a checkpoint need not supply: BN counters, and deformable offsets (start at zero).
_MAY_BE_MISSING = re.compile(r"(num_batches_tracked$|\.conv2\.offset\.)")


def _fetch(weights: str, spec: Optional[WeightsSpec], model_dir, progress: bool) -> Path:
    if weights in WEIGHTS:
        registered = WEIGHTS[weights]
        return download_weights(registered.url, sha256=registered.sha256, model_dir=model_dir,
                                progress=progress)
    if is_url(weights):
        sha = spec.sha256 if spec is not None and spec.url == weights else None
        return download_weights(weights, sha256=sha, model_dir=model_dir, progress=progress)
    if os.path.isfile(weights):
        return Path(weights)
    raise unknown_name(weights)


def _check_shapes(model_sd: Mapping[str, torch.Tensor], ckpt: StateDict, weights: str,
                  ckpt_arch: Optional[str]) -> None:
    for key, target in model_sd.items():
        value = ckpt.get(key)
        if value is not None and value.shape != target.shape:
            looks = f" (the checkpoint looks like a {ckpt_arch})" if ckpt_arch else ""
            raise ValueError(
                f"shape mismatch loading {weights}{looks}: key {key!r} has shape "
                f"{tuple(value.shape)} in the checkpoint but {tuple(target.shape)} in the model"
            )


def load_pretrained(
    model: nn.Module, weights: Union[str, os.PathLike], *, spec: Optional[WeightsSpec] = None,
    progress: bool = True, model_dir: Optional[Union[str, os.PathLike]] = None,
    strict: bool = True,
) -> LoadReport:
    """Load ``weights`` (registered name, URL or path) into a ResNet ``model`` in place.

    Names are converted to ours (the source is detected from the keys; ``spec.source == "timm"``
    uses the timm converter). A shape mismatch raises ValueError naming the key and both
    shapes. Keys of parts the model lacks (a classifier head ``fc.*``/``linear.*`` in a
    headless backbone, stages after its last output) are reported as unexpected and skipped.
    With ``strict``, an unexpected key inside a part the model has (say res4.6 of a ResNet-101
    file in a ResNet-50), or a missing key other than BN counters and deformable offsets,
    raises ValueError. The normalization the weights expect is in their spec (the registry's
    ``WeightsSpec``), not on the model. Returns a LoadReport, also logged.
    """
    weights = os.fspath(weights)
    if spec is None:
        spec = resolve_weights(weights)
    path = _fetch(weights, spec, model_dir, progress)
    raw, meta = read_checkpoint(path)
    raw, dropped = select_body(raw)
    source = "timm" if spec is not None and spec.source == "timm" else None
    state_dict, fmt = convert_to_ours(raw, source)

    model_sd = model.state_dict()
    _check_shapes(model_sd, state_dict, weights, guess_arch(state_dict))
    result = model.load_state_dict(state_dict, strict=False)
    missing = list(result.missing_keys)
    unexpected = list(result.unexpected_keys)
    report = LoadReport(
        weights=weights, file=str(path), format=fmt,
        loaded=sum(1 for k in state_dict if k in model_sd),
        missing_keys=missing, unexpected_keys=unexpected, dropped=dropped,
    )
    # Keys of parts the model did not build (the classifier of a headless backbone, res5 of a
    # C4 body ending at res4) are unused, not wrong; a surplus inside a built part is wrong.
    built = {name for name, _ in model.named_children()}
    bad_missing = [k for k in missing if not _MAY_BE_MISSING.search(k)]
    bad_unexpected = [k for k in unexpected if k.split(".", 1)[0] in built]
    if strict and (bad_missing or bad_unexpected):
        raise ValueError(
            f"weights {weights} do not fit this {type(model).__name__}: missing keys "
            f"[{_short(bad_missing)}], unexpected keys [{_short(bad_unexpected)}] "
            f"(checkpoint names read as {fmt}); pass strict=False to load the rest"
        )
    _check_style(model, spec, fmt)
    logger.info("%s", report)
    return report


def _check_style(model: nn.Module, spec: Optional[WeightsSpec], fmt: str) -> None:
    """Warn when the weights' stride layout differs from the model's (the shapes fit, the
    features will not). Normalization is not the backbone's to hold: the registry's spec
    (``WEIGHTS[name].pixel_mean`` ...) describes it, and detectors take it from their
    config (``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` / ``INPUT_FORMAT``)."""
    if spec is not None:
        style = spec.style
    elif fmt == "caffe2":
        style = "caffe"
    elif fmt in ("torchvision", "timm"):
        style = "pytorch"
    else:
        return
    model_style = getattr(model, "style", None)
    if model_style is not None and model_style != style:
        logger.warning("weights were trained with style=%r (stride in the %s) but the model is "
                       "style=%r: the shapes fit, the features will not", style,
                       "first 1x1" if style == "caffe" else "3x3", model_style)
