"""Pretrained weights as data, and a loader that never runs code from a file.

Each named checkpoint is a frozen ``WeightsSpec``: where the file is, its sha256, how its
parameters are named, and the input normalization it was trained with. ``load_pretrained``
takes a registered name, a URL or a local path, downloads through torch.hub's cache, checks
the hash, converts the names to ours and loads them::

    from backbones import list_weights, resnet50
    list_weights("resnet50")            # ['detectron2/R-50', 'timm/resnet50.a1_in1k', ...]
    body = resnet50(weights="detectron2/R-50")     # caffe style, BGR, std 1
    body.input_format, body.pixel_mean             # ('BGR', (103.53, 116.28, 123.675))

Offline, a name or URL loads from the cache (``torch.hub.get_dir()/checkpoints``, or
``model_dir``); the error for a missing file names the URL and the exact path to put it at.
"""

import difflib
import hashlib
import logging
import os
import pickle
import re
import urllib.error
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from .convert import StateDict, convert_to_ours, detect_format, to_tensors
from .pickle_safe import safe_load

logger = logging.getLogger(__name__)

SOURCES = ("torchvision", "detectron2", "timm")
# MSRA's Caffe2 weights: BGR input, mean subtracted, no division (std folded into conv1).
MSRA_MEAN_BGR = (103.530, 116.280, 123.675)
MSRA_STD_BGR = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class WeightsSpec:
    """One pretrained checkpoint, described as data.

    ``sha256`` is the full hash or the published prefix (torchvision's 8 hex digits, also in
    its file names), None where nothing is published. ``source`` is the project whose
    parameter names the file uses. ``pixel_mean``/``pixel_std`` are on a 0-255 scale, in
    ``input_format`` channel order. ``style`` says where the bottleneck stride sits ("pytorch":
    the 3x3, "caffe": the first 1x1). ``metrics`` holds published numbers, e.g.
    ``{"imagenet_acc@1": 80.858}``.
    """

    name: str
    arch: str
    url: str
    sha256: Optional[str]
    source: str
    input_format: str = "RGB"
    pixel_mean: Tuple[float, float, float] = IMAGENET_MEAN_RGB
    pixel_std: Tuple[float, float, float] = IMAGENET_STD_RGB
    style: str = "pytorch"
    num_classes: int = 1000
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"{self.name}: source must be one of {SOURCES}, got {self.source!r}")
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"{self.name}: input_format must be 'RGB' or 'BGR'")
        if self.style not in ("pytorch", "caffe"):
            raise ValueError(f"{self.name}: style must be 'pytorch' or 'caffe'")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError(f"{self.name}: pixel_mean and pixel_std need 3 values")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{8,64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 8 to 64 lowercase hex digits")
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        # a mappingproxy cannot be pickled: rebuild from plain values (DDP spawn, checkpoints)
        values = tuple(dict(self.metrics) if f.name == "metrics" else getattr(self, f.name)
                       for f in fields(self))
        return (type(self), values)

    @property
    def file_name(self) -> str:
        """The file's name in the download cache."""
        return cache_file_name(self.url)


# ------------------------------------------------------------------------------ registry

# torchvision's ImageNet weights: (arch, tag, url, sha256 prefix, acc@1, acc@5). The URLs are
# those of torchvision 0.29.1's ``*_Weights`` enums; the 8 hex digits in each file name are
# the start of the file's sha256.
_TORCHVISION = (
    ("resnet18", "imagenet1k_v1", "resnet18-f37072fd.pth", "f37072fd", 69.758, 89.078),
    ("resnet34", "imagenet1k_v1", "resnet34-b627a593.pth", "b627a593", 73.314, 91.42),
    ("resnet50", "imagenet1k_v1", "resnet50-0676ba61.pth", "0676ba61", 76.13, 92.862),
    ("resnet50", "imagenet1k_v2", "resnet50-11ad3fa6.pth", "11ad3fa6", 80.858, 95.434),
    ("resnet101", "imagenet1k_v1", "resnet101-63fe2227.pth", "63fe2227", 77.374, 93.546),
    ("resnet101", "imagenet1k_v2", "resnet101-cd907fc2.pth", "cd907fc2", 81.886, 95.78),
    ("resnet152", "imagenet1k_v1", "resnet152-394f9c45.pth", "394f9c45", 78.312, 94.046),
    ("resnet152", "imagenet1k_v2", "resnet152-f82ba261.pth", "f82ba261", 82.284, 96.002),
    ("resnext50_32x4d", "imagenet1k_v1", "resnext50_32x4d-7cdf4587.pth", "7cdf4587",
     77.618, 93.698),
    ("resnext50_32x4d", "imagenet1k_v2", "resnext50_32x4d-1a0047aa.pth", "1a0047aa",
     81.198, 95.34),
    ("resnext101_32x8d", "imagenet1k_v1", "resnext101_32x8d-8ba56ff5.pth", "8ba56ff5",
     79.312, 94.526),
    ("resnext101_32x8d", "imagenet1k_v2", "resnext101_32x8d-110c445d.pth", "110c445d",
     82.834, 96.228),
    ("wide_resnet50_2", "imagenet1k_v1", "wide_resnet50_2-95faca4d.pth", "95faca4d",
     78.468, 94.086),
    ("wide_resnet50_2", "imagenet1k_v2", "wide_resnet50_2-9ba9bcbe.pth", "9ba9bcbe",
     81.602, 95.758),
)
_TORCHVISION_BASE = "https://download.pytorch.org/models/"

# detectron2's MSRA ImageNet weights (Caffe2 names, stride in the 1x1, affine-only norms).
# No hash is published for them.
_DETECTRON2 = (("R-50", "resnet50"), ("R-101", "resnet101"))
_DETECTRON2_BASE = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/"

# timm's plain ResNet-50 checkpoints on the Hugging Face hub (torchvision-like names,
# ImageNet mean/std). No hash recorded here.
_TIMM = ("a1_in1k", "a1h_in1k", "a2_in1k", "a3_in1k", "tv_in1k", "tv2_in1k")
_TIMM_BASE = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"


def _build_registry() -> Dict[str, WeightsSpec]:
    specs: List[WeightsSpec] = []
    for arch, tag, file_name, sha, acc1, acc5 in _TORCHVISION:
        specs.append(WeightsSpec(
            name=f"torchvision/{arch}.{tag}", arch=arch, url=_TORCHVISION_BASE + file_name,
            sha256=sha, source="torchvision",
            metrics={"imagenet_acc@1": acc1, "imagenet_acc@5": acc5},
        ))
    for short, arch in _DETECTRON2:
        specs.append(WeightsSpec(
            name=f"detectron2/{short}", arch=arch, url=f"{_DETECTRON2_BASE}{short}.pkl",
            sha256=None, source="detectron2", input_format="BGR", pixel_mean=MSRA_MEAN_BGR,
            pixel_std=MSRA_STD_BGR, style="caffe",
        ))
    for tag in _TIMM:
        specs.append(WeightsSpec(
            name=f"timm/resnet50.{tag}", arch="resnet50",
            url=_TIMM_BASE.format(f"resnet50.{tag}"), sha256=None, source="timm",
        ))
    return {s.name: s for s in specs}


WEIGHTS: Mapping[str, WeightsSpec] = MappingProxyType(_build_registry())


def list_weights(arch: Optional[str] = None) -> List[str]:
    """Registered weight names, sorted; only those for ``arch`` when given."""
    return sorted(n for n, s in WEIGHTS.items() if arch is None or s.arch == arch)


class UnknownWeightsError(KeyError, ValueError):
    """A weights name that is not registered, not a URL and not an existing file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(FileNotFoundError):
    """The file could be neither downloaded nor found in the cache."""


class ChecksumError(RuntimeError):
    """A downloaded file whose sha256 differs from the recorded one."""


def _is_url(weights: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", weights) is not None


def _unknown_name(weights: str) -> Exception:
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
    if spec is None and _is_url(weights):
        spec = next((s for s in WEIGHTS.values() if s.url == weights), None)
        if spec is None:
            cached = _cache_dir(None) / cache_file_name(weights)
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
    raise _unknown_name(weights)


def _infer_spec(path: Path, name: str, arch: Optional[str]) -> Optional[WeightsSpec]:
    """A spec for an unregistered file, from its parameter names; None when they do not
    tell the normalization it was trained with."""
    state_dict, meta = read_checkpoint(path)
    state_dict, _ = _select_body(state_dict)
    try:
        fmt = detect_format(state_dict)
    except ValueError:
        return None
    converted, _ = convert_to_ours(state_dict, fmt)
    guessed = guess_arch(converted) or arch or "unknown"
    fc = converted.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None else 0
    url = path.resolve().as_uri() if not _is_url(name) else name
    author = str(meta.get("__author__", "")).lower()
    if fmt == "caffe2" or (fmt == "detectron2" and author in ("caffe2", "msra")):
        return WeightsSpec(
            name=name, arch=guessed, url=url, sha256=None, source="detectron2",
            input_format="BGR", pixel_mean=MSRA_MEAN_BGR, pixel_std=MSRA_STD_BGR,
            style="caffe", num_classes=num_classes,
        )
    if fmt == "torchvision" or (fmt == "detectron2" and author == "torchvision"):
        return WeightsSpec(
            name=name, arch=guessed, url=url, sha256=None,
            source="torchvision" if fmt == "torchvision" else "detectron2",
            num_classes=num_classes,
        )
    return None


def guess_arch(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The entry of ``resnet.ARCHS`` whose block counts and widths match a state dict in our
    naming, or None."""
    from .resnet import ARCHS

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
    for name, (b, layers, g, w) in ARCHS.items():
        if (b, tuple(layers), g, w) == (block, tuple(counts), groups, width):
            return name
    return None


# ------------------------------------------------------------------------------ download

def cache_file_name(url: str) -> str:
    """A URL's file name in the cache: its last path part, except that Hugging Face hub files
    (all called e.g. ``model.safetensors``) get their repository in front
    (``timm--resnet50.a1_in1k--model.safetensors``) and detectron2's files their whole path
    (``detectron2--ImageNetPretrained--MSRA--R-50.pkl``)."""
    parsed = urllib.parse.urlparse(url)
    parts = [urllib.parse.unquote(p) for p in parsed.path.split("/") if p]
    if not parts:
        raise ValueError(f"URL {url!r} names no file")
    if parsed.netloc.endswith("huggingface.co") and "resolve" in parts:
        i = parts.index("resolve")
        return "--".join(parts[:i] + [parts[-1]])
    if parsed.netloc == "dl.fbaipublicfiles.com" and parts[0] == "detectron2":
        return "--".join(parts)  # MSRA/R-50.pkl and torchvision/R-50.pkl both exist there
    return parts[-1]


def _cache_dir(model_dir: Optional[Union[str, os.PathLike]]) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hash_prefix_in_name(file_name: str) -> Optional[str]:
    """torchvision's convention: ``name-<first hex digits of sha256>.ext``. A run of digits
    alone (``model-20240101.pth``) reads as a date, not a hash."""
    m = re.search(r"-([0-9a-f]{8,64})\.[^-]+$", file_name)
    return m.group(1) if m and re.search("[a-f]", m.group(1)) else None


def sha256_of_file(path: Union[str, os.PathLike]) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(
    url: str, *, sha256: Optional[str] = None, model_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> Path:
    """The cached file for ``url``, downloading it first if it is not cached.

    The cache is ``model_dir`` or ``torch.hub.get_dir()/checkpoints``. A new file is checked
    against ``sha256`` (a full hash or a prefix; by default the prefix in a torchvision-style
    file name) before it enters the cache: a mismatch deletes it and raises ChecksumError
    naming the file and both hashes. When the download fails and nothing is cached,
    WeightsUnavailableError names the URL and the exact path to put the file at.
    """
    cache_dir = _cache_dir(model_dir)
    dst = cache_dir / cache_file_name(url)
    if dst.is_file():
        return dst
    expected = (sha256 or _hash_prefix_in_name(dst.name) or "").lower() or None
    tmp = dst.with_name(dst.name + ".partial")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, dst)
        torch.hub.download_url_to_file(url, str(tmp), hash_prefix=None, progress=progress)
    except (urllib.error.URLError, OSError, ValueError) as err:
        tmp.unlink(missing_ok=True)
        raise WeightsUnavailableError(
            f"could not download {url} ({err}) and it is not in the cache. To use it offline, "
            f"download that URL on a connected machine and put the file at {dst} "
            "(or pass its local path as weights)"
        ) from err
    if expected is not None:
        actual = sha256_of_file(tmp)
        if not actual.startswith(expected):
            tmp.unlink(missing_ok=True)
            raise ChecksumError(
                f"sha256 mismatch for {dst.name} downloaded from {url}: expected {expected}..., "
                f"got {actual}. The file was deleted; download it again, or check the URL"
            )
    os.replace(tmp, dst)
    return dst


# ------------------------------------------------------------------------------ reading

def _unwrap(obj: Any) -> Tuple[Mapping[str, Any], Dict[str, Any]]:
    """The parameter mapping inside a checkpoint and its other top-level entries."""
    meta: Dict[str, Any] = {}
    while isinstance(obj, Mapping):
        inner = next((k for k in ("blobs", "model", "state_dict") if isinstance(
            obj.get(k), Mapping)), None)
        if inner is None:
            break
        meta.update({k: v for k, v in obj.items() if k != inner and isinstance(v, (str, int))})
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint should hold a name -> array mapping, got "
                         f"{type(obj).__name__}")
    return obj, meta


def read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[StateDict, Dict[str, Any]]:
    """Read a weights file without running code from it: ``.safetensors`` with safetensors,
    ``.pkl`` with the restricted unpickler (latin-1), anything else with
    ``torch.load(weights_only=True)``. Returns (name -> tensor, metadata such as
    ``__author__``); Caffe2 ``*_momentum`` blobs are dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), {}
        if suffix in (".pkl", ".pickle"):
            raw: Any = safe_load(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"cannot read weights file {path}: {err}") from err
    params, meta = _unwrap(raw)
    params = {k: v for k, v in params.items() if not str(k).endswith("_momentum")}
    return to_tensors(params), meta


# Prefixes under which a detector (detectron2, torchvision, our FPN) keeps its ResNet body.
_BODY_PREFIXES = ("backbone.bottom_up.", "backbone.body.", "bottom_up.", "backbone.")


def _select_body(state_dict: StateDict) -> Tuple[StateDict, int]:
    """Strip a DDP ``module.`` prefix and keep only a detector checkpoint's backbone body.
    Returns (body params, number of other keys dropped)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    for prefix in _BODY_PREFIXES:
        body = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if body:
            return body, len(state_dict) - len(body)
    return state_dict, 0


# ------------------------------------------------------------------------------ loading

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
    if _is_url(weights):
        sha = spec.sha256 if spec is not None and spec.url == weights else None
        return download_weights(weights, sha256=sha, model_dir=model_dir, progress=progress)
    if os.path.isfile(weights):
        return Path(weights)
    raise _unknown_name(weights)


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
    raises ValueError. Sets ``model.input_format``,
    ``pixel_mean`` and ``pixel_std`` from the spec (given, registered or inferred). Returns a
    LoadReport, also logged.
    """
    weights = os.fspath(weights)
    if spec is None:
        spec = resolve_weights(weights)
    path = _fetch(weights, spec, model_dir, progress)
    raw, meta = read_checkpoint(path)
    raw, dropped = _select_body(raw)
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
    _set_normalization(model, spec, fmt, meta)
    logger.info("%s", report)
    return report


def _set_normalization(model: nn.Module, spec: Optional[WeightsSpec], fmt: str,
                       meta: Mapping[str, Any]) -> None:
    if spec is None and fmt == "caffe2":
        spec_like = ("BGR", MSRA_MEAN_BGR, MSRA_STD_BGR, "caffe")
    elif spec is None and fmt in ("torchvision", "timm"):
        spec_like = ("RGB", IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, "pytorch")
    elif spec is not None:
        spec_like = (spec.input_format, spec.pixel_mean, spec.pixel_std, spec.style)
    else:
        logger.info("normalization of these weights is unknown (%s names, author %r); the "
                    "model keeps its pixel mean/std", fmt, meta.get("__author__"))
        return
    input_format, mean, std, style = spec_like
    model.input_format = input_format
    model.pixel_mean = tuple(mean)
    model.pixel_std = tuple(std)
    model_style = getattr(model, "style", None)
    if model_style is not None and model_style != style:
        logger.warning("weights were trained with style=%r (stride in the %s) but the model is "
                       "style=%r: the shapes fit, the features will not", style,
                       "first 1x1" if style == "caffe" else "3x3", model_style)
