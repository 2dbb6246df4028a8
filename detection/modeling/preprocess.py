"""Turning a list of 0-255 RGB images into one normalized, resized, padded batch, and
mapping detections back to input-image pixels."""

import random
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tracing import Size, as_size, is_tracing, size_tensor

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


def _where(cond, a, b):
    return torch.where(cond, a, b) if isinstance(cond, Tensor) else (a if cond else b)


def resized_shape(h: Size, w: Size, min_size: int, max_size: int) -> Tuple[Size, Size]:
    """detectron2's ResizeShortestEdge: shortest edge to ``min_size``, longest capped at
    ``max_size``, sides rounded half up. Python floats in eager mode, the same float64
    arithmetic in tensors when the sizes are traced."""
    if isinstance(h, Tensor):
        h, w = h.to(torch.float64), w.to(torch.float64)
    scale = min_size / _where(h < w, h, w)
    new_h = _where(h < w, min_size, scale * h)
    new_w = _where(h < w, scale * w, min_size)
    longest = _where(new_h > new_w, new_h, new_w)
    cap = _where(longest > max_size, max_size / longest, 1.0)
    new_h, new_w = new_h * cap, new_w * cap
    if isinstance(new_h, Tensor):
        return (torch.floor(new_h + 0.5).to(torch.int64),
                torch.floor(new_w + 0.5).to(torch.int64))
    return int(new_h + 0.5), int(new_w + 0.5)


def torchvision_resized_shape(h: Size, w: Size, min_size: int,
                              max_size: int) -> Tuple[Size, Size]:
    """torchvision's GeneralizedRCNNTransform resize in eager mode: one scale,
    ``min(min_size / short, max_size / long)`` in float64, for both sides; each side
    floored (as ``interpolate``'s ``recompute_scale_factor``)."""
    hw = size_tensor([h, w], dtype=torch.float64, device=torch.device("cpu"))
    # true divisions, as torchvision's Python floats: ``number / tensor`` multiplies by the
    # reciprocal, which rounds 187 * (192 / 187) down to 191.99999999999997
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)
    scale = torch.minimum(limits[0] / hw.min(), limits[1] / hw.max())
    out = torch.floor(hw * scale).to(torch.int64)
    return as_size(out[0]), as_size(out[1])


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
            size = torchvision_resized_shape(h, w, min_size, max_size)
        else:
            size = resized_shape(h, w, min_size, max_size)
            if not is_tracing() and size == (h, w):
                return img
        return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Tuple[Tensor, List[Tuple[int, int]], Optional[List[Dict[str, Tensor]]]]:
        """-> (batch ``(N, 3, H, W)``, per-image resized ``(h, w)`` before padding, targets
        with boxes scaled to the resized images)."""
        if not is_tracing():
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
            nh, nw = as_size(x.shape[-2]), as_size(x.shape[-1])
            out.append(x)
            sizes.append((nh, nw))
            if targets is not None:
                t = dict(targets[i])
                if (nh, nw) != (h, w):
                    ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=dtype,
                                         device=x.device)
                    t["boxes"] = t["boxes"].to(x.device, dtype) * ratio
                    if "keypoints" in t:
                        t["keypoints"] = t["keypoints"].to(x.device, dtype) * torch.cat(
                            [ratio[:2], ratio.new_ones(1)])
                else:
                    t["boxes"] = t["boxes"].to(x.device, dtype)
                new_targets.append(t)
        return self.pad(out), sizes, new_targets

    def pad(self, images: Sequence[Tensor]) -> Tensor:
        """Zero-pad ``(3, h_i, w_i)`` images into one ``(N, 3, H, W)`` batch, H and W
        multiples of ``size_divisibility``."""
        if len(images) == 1:  # no max() over sizes: stays symbolic under tracing
            h, w = images[0].shape[-2:]
        else:
            h = max(int(img.shape[-2]) for img in images)
            w = max(int(img.shape[-1]) for img in images)
        d = max(self.size_divisibility, 1)
        h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
        if len(images) == 1:
            img = images[0]
            return F.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2]))[None]
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for b, img in zip(batch, images):
            b[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch


def rescale_boxes(boxes: Tensor, from_size: Tuple[Size, Size], to_size: Tuple[Size, Size],
                  clip: bool = True) -> Tensor:
    """Map ``boxes`` ``(N, 4)`` from an image of ``from_size`` (h, w) to one of ``to_size``,
    clipped to the latter."""
    (fh, fw), (th, tw) = from_size, to_size
    if is_tracing() or (fh, fw) != (th, tw):
        sizes = size_tensor([fw, fh, tw, th], dtype=boxes.dtype, device=boxes.device)
        boxes = boxes * (sizes[2:] / sizes[:2]).repeat(2)
    if clip:
        limits = size_tensor([tw, th, tw, th], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
    return boxes


def rescale_keypoints(keypoints: Tensor, from_size: Tuple[Size, Size],
                      to_size: Tuple[Size, Size]) -> Tensor:
    """Map ``keypoints`` ``(N, K, 3)`` (x, y, v) from an image of ``from_size`` (h, w) to one of
    ``to_size``; v is kept, nothing is clipped (as torchvision)."""
    (fh, fw), (th, tw) = from_size, to_size
    if not is_tracing() and (fh, fw) == (th, tw):
        return keypoints
    sizes = size_tensor([fw, fh, tw, th], dtype=keypoints.dtype, device=keypoints.device)
    scale = torch.cat([sizes[2:] / sizes[:2], sizes.new_ones(1)])
    return keypoints * scale


def detector_inputs(model: nn.Module, images: Sequence[Tensor],
                    targets: Optional[List[Dict[str, Tensor]]]):
    """A detector's first step: in training its ``targets`` are required and checked against
    ``model.num_classes``; ``model.preprocessor`` normalizes, resizes and batches the images;
    the batch takes the dtype and channels-last layout ``optimize_for_inference`` chose
    (``as_model_input``).
    -> (batch, per-image resized sizes, targets in the resized images, None at inference)."""
    if model.training:
        if targets is None:
            raise ValueError(f"in training mode {type(model).__name__} needs targets (call "
                             "model.eval() for inference)")
        check_targets(targets, len(images), model.num_classes)
    batch, sizes, targets = model.preprocessor(images, targets if model.training else None)
    return as_model_input(model, batch), sizes, targets


def as_model_input(model: nn.Module, batch: Tensor) -> Tensor:
    """``batch`` in the dtype (bf16 for a bf16 backbone) and channels-last layout that
    ``detection.optimize.optimize_for_inference`` chose for ``model``."""
    if getattr(model, "input_channels_last", False):
        batch = batch.to(dtype=model.input_dtype, memory_format=torch.channels_last)
    return batch


def in_input_pixels(detections, sizes: Sequence[Tuple[Size, Size]],
                    images: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
    """Per image, the result dict of ``detections`` (``Detections``, boxes in the resized
    image of ``sizes``) with its boxes (and keypoints) mapped to the input image's pixels."""
    results = []
    for det, size, img in zip(detections, sizes, images):
        if getattr(det, "keypoints", None) is not None:
            det.keypoints = rescale_keypoints(det.keypoints, size, tuple(img.shape[-2:]))
        det.boxes = rescale_boxes(det.boxes, size, tuple(img.shape[-2:]))
        results.append(det.to_dict())
    return results
