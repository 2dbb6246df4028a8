"""Anchor boxes on every feature-map location of every level."""

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .tracing import is_tracing


def cell_anchors(
    sizes: Sequence[float], aspect_ratios: Sequence[float], *, round_base: bool,
    ratio_major: bool,
) -> Tensor:
    """Anchors ``(len(sizes) * len(aspect_ratios), 4)`` centred on (0, 0), xyxy.

    An aspect ratio is height / width; an anchor of size s has area s**2.
    ``ratio_major`` orders them ratio by ratio (torchvision), else size by size (detectron2);
    ``round_base`` rounds the corners to integers (torchvision).
    """
    rows = []
    pairs = ([(s, a) for a in aspect_ratios for s in sizes] if ratio_major
             else [(s, a) for s in sizes for a in aspect_ratios])
    for size, ratio in pairs:
        if round_base:  # torchvision: w = s / sqrt(r), h = s * sqrt(r), computed in float32
            h_ratio = torch.sqrt(torch.tensor(ratio, dtype=torch.float32))
            w = (1 / h_ratio) * size
            h = h_ratio * size
            rows.append(torch.stack([-w, -h, w, h]) / 2)
        else:  # detectron2: w = sqrt(s**2 / r), h = r * w, in double precision
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append(torch.tensor([-w / 2, -h / 2, w / 2, h / 2], dtype=torch.float32))
    anchors = torch.stack(rows)
    return anchors.round() if round_base else anchors


class AnchorGenerator(nn.Module):
    """Anchors of every level, shared by all images of a batch.

    Args:
        sizes: per level, the anchor sizes (sqrt of the area, input pixels).
        aspect_ratios: per level (or one list for all levels), height / width ratios.
        strides: per level, input pixels per feature-map cell.
        offset: anchor centres at ``(i + offset) * stride``; 0.0 for both peers.
        round_base: round the cell anchors to integers (torchvision).
        ratio_major: cell anchor order ratio by ratio (torchvision) or size by size.
        infer_strides: take each level's stride as ``padded image size // feature size``
            (torchvision; p6 of an 800-pixel image gets 61, not 64) instead of ``strides``.
    """

    def __init__(
        self, *, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int], offset: float = 0.0, round_base: bool = False,
        ratio_major: bool = False, infer_strides: bool = False,
    ) -> None:
        super().__init__()
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = list(aspect_ratios) * len(sizes)
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(f"anchor sizes ({len(sizes)} levels), aspect ratios "
                             f"({len(aspect_ratios)}) and strides ({len(strides)}) disagree")
        self.strides = [int(s) for s in strides]
        self.offset, self.infer_strides = float(offset), infer_strides
        self.num_anchors = [len(s) * len(a) for s, a in zip(sizes, aspect_ratios)]
        for i, (s, a) in enumerate(zip(sizes, aspect_ratios)):
            base = cell_anchors(s, a, round_base=round_base, ratio_major=ratio_major)
            self.register_buffer(f"cell_anchors_{i}", base, persistent=False)
        self._cache: Dict[tuple, List[Tensor]] = {}

    def _grid(self, base: Tensor, size: Tuple[int, int], stride: Tuple[int, int],
              like: Tensor) -> Tensor:
        h, w = size
        shift_x = (torch.arange(w, device=like.device, dtype=torch.float64) + self.offset)
        shift_y = (torch.arange(h, device=like.device, dtype=torch.float64) + self.offset)
        sy, sx = torch.meshgrid(shift_y * stride[0], shift_x * stride[1], indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1).to(like.dtype)  # [H*W, 4]
        return (shifts[:, None, :] + base.to(like.dtype)[None]).reshape(-1, 4)

    def forward(self, features: Sequence[Tensor], padded_size: Tuple[int, int]) -> List[Tensor]:
        """Per level, anchors ``(H_l * W_l * A_l, 4)``, location-major then anchor index, for
        feature maps ``(N, C, H_l, W_l)`` of a batch padded to ``padded_size`` (h, w); float32
        (float64 for float64 features)."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        # anchors in float32 at least: features of a bf16 backbone would round the anchor
        # coordinates to a pixel or two
        like = features[0].new_empty((), dtype=torch.promote_types(features[0].dtype,
                                                                    torch.float32))
        tracing = is_tracing()  # traced sizes are tensors: compute, never cache
        key = (tuple(sizes), tuple(padded_size), like.device, like.dtype)
        cached = None if tracing else self._cache.get(key)
        if cached is not None:
            return cached
        out = []
        for i, size in enumerate(sizes):
            if self.infer_strides:
                stride = (padded_size[0] // size[0], padded_size[1] // size[1])
            else:
                stride = (self.strides[i], self.strides[i])
            out.append(self._grid(getattr(self, f"cell_anchors_{i}"), size, stride, like))
        if not tracing:
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = out
        return out
