"""Downloading weight files into torch.hub's cache, checked against their sha256.

Offline, a URL loads from the cache (``torch.hub.get_dir()/checkpoints``, or ``model_dir``);
the error for a missing file names the URL and the exact path to put it at.
"""

import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)


class WeightsUnavailableError(FileNotFoundError):
    """The file could be neither downloaded nor found in the cache."""


class ChecksumError(RuntimeError):
    """A downloaded file whose sha256 differs from the recorded one."""


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


def cache_root(model_dir: Optional[Union[str, os.PathLike]]) -> Path:
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
    cache_dir = cache_root(model_dir)
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
