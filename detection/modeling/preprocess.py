"""Turning a list of 0-255 RGB images into one normalized, resized, padded batch, and
mapping detections back to input-image pixels."""

import math
import random
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESIZE_MODES = ("torchvision", "detectron2")


def check_images(images: Sequence[Tensor]) -> None:
    """Refuse anything but a non-empty list of ``(3, H, W)`` uint8 or float tensors."""
    if isinstance(images, Tensor):
        raise TypeError("the detector expects a list of (3, H, W) tensors, got one Tensor of "
                        f"shape {tuple(images.shape)}; pass list(batch) instead")
    if len(images) == 0:
        raise ValueError("the detector got an empty list of images")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise TypeError(f"image {i} is a {type(img).__name__}, expected a (3, H, W) Tensor")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected (3, H, W) RGB "
                             "(channels first, 3 channels)")
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"image {i} is empty: shape {tuple(img.shape)}")
        if not (img.dtype == torch.uint8 or img.is_floating_point()):
            raise TypeError(f"image {i} (shape {tuple(img.shape)}) has dtype {img.dtype}; "
                            "expected uint8 or float on a 0-255 scale")


def check_targets(targets: Sequence[Dict[str, Tensor]], num_images: int,
                  num_classes: int) -> None:
    """Refuse malformed training targets, naming the image (and box) at fault."""
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise KeyError(f"target {i} needs 'boxes' and 'labels', has {sorted(t)}")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"target {i}: boxes must have shape (N, 4), got "
                             f"{tuple(boxes.shape)}")
        if labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: labels have shape {tuple(labels.shape)} for "
                             f"{boxes.shape[0]} boxes")
        if boxes.numel() == 0:
            continue
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} has x2 < x1 or y2 < y1 "
                             "(boxes are x1, y1, x2, y2)")
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"target {i}: boxes contain NaN or inf")
        if labels.is_floating_point():
            raise TypeError(f"target {i}: labels must be int64, got {labels.dtype}")
        out = (labels < 0) | (labels >= num_classes)
        if bool(out.any()):
            j = int(torch.nonzero(out)[0, 0])
            raise ValueError(f"target {i}: label {int(labels[j])} of box {j} is outside "
                             f"0..{num_classes - 1} (contiguous labels, no background)")


def resized_shape(h: int, w: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """detectron2's ResizeShortestEdge: shortest edge to ``min_size``, longest capped at
    ``max_size``, sides rounded half up."""
    scale = min_size / min(h, w)
    new_h, new_w = (min_size, scale * w) if h < w else (scale * h, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


class Preprocessor(nn.Module):
    """Channel order, normalization, resizing and padding of a detector's input.

    Args:
        pixel_mean, pixel_std: per channel, 0-255 scale, in the order of ``input_format``.
        input_format: "RGB" or "BGR", what the weights expect (input is always RGB).
        min_size_test, max_size_test: evaluation resize.
        min_size_train, max_size_train: training resize; one of ``min_size_train`` is drawn
            per image.
        resize_mode: "torchvision" (bilinear interpolate with a scale factor, size recomputed
            by torch) or "detectron2" (target size rounded half up, bilinear to that size).
        resize_in_train: resize in training too; off when the data loader already resized.
        size_divisibility: pad height and width up to a multiple of it.

    The order follows torchvision: normalize, then resize, then pad with zeros.
    """

    def __init__(
        self, *, pixel_mean: Sequence[float], pixel_std: Sequence[float],
        input_format: str = "RGB", min_size_test: int = 800, max_size_test: int = 1333,
        min_size_train: Sequence[int] = (800,), max_size_train: int = 1333,
        resize_mode: str = "detectron2", resize_in_train: bool = True,
        size_divisibility: int = 32,
    ) -> None:
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Python floats too, so that a float64 model normalizes with exact float64 values.
        self._mean, self._std = [float(v) for v in pixel_mean], [float(v) for v in pixel_std]
        self.input_format = input_format
        self.min_size_test, self.max_size_test = int(min_size_test), int(max_size_test)
        self.min_size_train = tuple(int(s) for s in min_size_train)
        self.max_size_train = int(max_size_train)
        self.resize_mode, self.resize_in_train = resize_mode, resize_in_train
        self.size_divisibility = int(size_divisibility)
        self._warned_unit_scale = False

    def _warn_if_unit_scale(self, images: Sequence[Tensor]) -> None:
        if self._warned_unit_scale or not images[0].is_floating_point():
            return
        lo = torch.stack([img.amin() for img in images]).min()
        hi = torch.stack([img.amax() for img in images]).max()
        if bool(lo >= 0) and bool(hi <= 1):
            warnings.warn("all input values lie in [0, 1]; the detector expects RGB images on "
                          "a 0-255 scale (uint8 or float), not torchvision-style 0-1 floats",
                          stacklevel=3)
            self._warned_unit_scale = True

    def _resize(self, img: Tensor, min_size: int, max_size: int) -> Tensor:
        h, w = img.shape[-2:]
        if self.resize_mode == "torchvision":
            scale = min(min_size / min(h, w), max_size / max(h, w))
            return F.interpolate(img[None], scale_factor=scale, mode="bilinear",
                                 recompute_scale_factor=True, align_corners=False)[0]
        size = resized_shape(h, w, min_size, max_size)
        if size == (h, w):
            return img
        return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Tuple[Tensor, List[Tuple[int, int]], Optional[List[Dict[str, Tensor]]]]:
        """-> (batch ``(N, 3, H, W)``, per-image resized ``(h, w)`` before padding, targets
        with boxes scaled to the resized images)."""
        check_images(images)
        self._warn_if_unit_scale(images)
        resize = self.resize_in_train or not self.training
        dtype = self.pixel_mean.dtype
        mean = torch.tensor(self._mean, dtype=dtype, device=self.pixel_mean.device).view(-1, 1, 1)
        std = torch.tensor(self._std, dtype=dtype, device=self.pixel_mean.device).view(-1, 1, 1)
        out, sizes, new_targets = [], [], [] if targets is not None else None
        for i, img in enumerate(images):
            x = img.to(device=self.pixel_mean.device, dtype=dtype)
            if self.input_format == "BGR":
                x = x.flip(0)
            x = (x - mean) / std
            h, w = x.shape[-2:]
            if resize:
                if self.training:
                    x = self._resize(x, random.choice(self.min_size_train), self.max_size_train)
                else:
                    x = self._resize(x, self.min_size_test, self.max_size_test)
            nh, nw = x.shape[-2:]
            out.append(x)
            sizes.append((int(nh), int(nw)))
            if targets is not None:
                t = dict(targets[i])
                if (nh, nw) != (h, w):
                    ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=dtype,
                                         device=x.device)
                    t["boxes"] = t["boxes"].to(x.device, dtype) * ratio
                else:
                    t["boxes"] = t["boxes"].to(x.device, dtype)
                new_targets.append(t)
        return self.pad(out), sizes, new_targets

    def pad(self, images: Sequence[Tensor]) -> Tensor:
        """Zero-pad ``(3, h_i, w_i)`` images into one ``(N, 3, H, W)`` batch, H and W
        multiples of ``size_divisibility``."""
        h = max(img.shape[-2] for img in images)
        w = max(img.shape[-1] for img in images)
        if self.size_divisibility > 1:
            d = self.size_divisibility
            h, w = int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for b, img in zip(batch, images):
            b[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch


def rescale_boxes(boxes: Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int],
                  clip: bool = True) -> Tensor:
    """Map ``boxes`` ``(N, 4)`` from an image of ``from_size`` (h, w) to one of ``to_size``,
    clipped to the latter."""
    (fh, fw), (th, tw) = from_size, to_size
    if (fh, fw) != (th, tw):
        ratio = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], dtype=boxes.dtype,
                             device=boxes.device)
        boxes = boxes * ratio
    if clip:
        limits = torch.tensor([tw, th, tw, th], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
    return boxes
