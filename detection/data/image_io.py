"""Decode images as RGB, one rule for every path: training and evaluation (``read_image`` of a
file), ``predict``, the demo and submission (``as_rgb_array`` of a file, a PIL image or an
array). 16-bit values are scaled to 8 bit, alpha is composited on black, palettes and
grayscale become RGB, and EXIF orientation is applied; errors name the file."""

from __future__ import annotations

import os
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "as_rgb_array", "image_size", "read_image"]


class ImageReadError(OSError):
    """An image file is missing, empty, truncated or not an image. The message names the file."""


def _to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL mode."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale the full range 0..65535 to 0..255.
        arr = np.asarray(img).astype(np.float64)
        if mode == "I" and arr.max(initial=0) > 65535:
            arr = arr / max(arr.max(), 1.0) * 65535.0
        gray = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on black: the transparent parts carry no content.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        return np.clip(np.round(rgba[:, :, :3] * alpha), 0, 255).astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def _composite(rgba: np.ndarray, alpha_max: float) -> np.ndarray:
    alpha = rgba[:, :, 3:4].astype(np.float32) / alpha_max
    return rgba[:, :, :3].astype(np.float32) * alpha


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB from an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array: uint8 and uint16
    as ``read_image`` decodes such files (uint8 out), float arrays kept float (0-255 expected;
    a 4th channel is alpha on 0-1 or 0-255)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape "
                         f"{arr.shape}")
    if arr.dtype == np.uint16:
        arr = np.clip(np.round(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    if arr.dtype == np.uint8:
        if arr.shape[2] == 4:
            return np.clip(np.round(_composite(arr, 255.0)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"image arrays must be uint8, uint16 or float, got {arr.dtype}")
    if arr.shape[2] == 4:
        return _composite(arr, 1.0 if arr[:, :, 3].max(initial=0) <= 1.0 else 255.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def as_rgb_array(image, *, exif_transpose: bool = True) -> np.ndarray:
    """(H, W, 3) RGB, 0-255, from a file path (``read_image``), a PIL image (any mode; its EXIF
    orientation applied, as for a file) or a numpy array (see ``_array_to_rgb``)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, exif_transpose=exif_transpose)
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image) if exif_transpose else image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"cannot read an image from a {type(image).__name__}")


def read_image(path: str | os.PathLike, *, exif_transpose: bool = True) -> np.ndarray:
    """Read ``path`` as (H, W, 3) uint8 RGB.

    Handles grayscale, RGBA/LA (composited on black), palette images, 16-bit PNGs (scaled to
    8 bit) and CMYK. With ``exif_transpose`` the EXIF orientation tag is applied, so the array is
    the image as a viewer shows it (COCO's sizes are of the transposed image too).

    Raises ImageReadError (an OSError) naming the file when it is missing, empty, truncated
    or not a readable image.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"Image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"Image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            img.load()  # truncated data surfaces here as OSError
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except UnidentifiedImageError as e:
        raise ImageReadError(f"Not a readable image (corrupt or unknown format): {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"Cannot decode image {path} (truncated or corrupt): {e}") from e


def _png_exif(path: str) -> bytes | None:
    """The eXIf chunk of a PNG found by walking its chunks (image data skipped, not read)."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return b"Exif\x00\x00" + f.read(length)
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC


def _orientation(img: Image.Image, path: str) -> int:
    """The EXIF orientation tag (1 when absent), read without decoding the pixels."""
    if img.format == "PNG" and "exif" not in img.info:
        # PIL's PNG getexif() decodes the whole image to look for an eXIf chunk after the data
        data = _png_exif(path)
        if data is None:
            return 1
        exif = Image.Exif()
        exif.load(data)
        return int(exif.get(0x0112, 1))
    return int(img.getexif().get(0x0112, 1))


def image_size(path: str | os.PathLike, *, exif_transpose: bool = True) -> tuple[int, int]:
    """(height, width) of the image as :func:`read_image` would return it, without decoding
    (the header, and for a PNG its chunk list)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if exif_transpose and _orientation(img, path) in (5, 6, 7, 8):
                w, h = h, w
            return h, w
    except FileNotFoundError as e:
        raise ImageReadError(f"Image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as e:
        raise ImageReadError(f"Not a readable image: {path}: {e}") from e
