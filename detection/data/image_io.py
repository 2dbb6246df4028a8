"""Read an image file as an RGB uint8 array, whatever the file's mode, with clear errors."""

from __future__ import annotations

import os
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image", "image_size"]


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
