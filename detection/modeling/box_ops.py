"""Box arithmetic on (..., 4) xyxy tensors: deltas coding, clipping, sizes.

All functions broadcast over leading dimensions and never loop over boxes.
"""

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms

from .tracing import Size, is_tracing, size_tensor

# Largest log-scale delta applied when decoding: exp() of more would make huge boxes.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes a target box relative to a reference box as (dx, dy, dw, dh) deltas and decodes
    them back (R-CNN parameterisation).

    Args:
        weights: (wx, wy, ww, wh) multipliers of the deltas: (1, 1, 1, 1) in the RPN,
            (10, 10, 5, 5) in Fast R-CNN heads.
        scale_clamp: upper bound on dw, dh before ``exp`` when decoding.
    """

    def __init__(
        self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder needs 4 weights, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """Deltas ``(..., 4)`` that turn ``references`` ``(..., 4)`` into ``targets``."""
        wx, wy, ww, wh = self.weights
        ref_w = references[..., 2] - references[..., 0]
        ref_h = references[..., 3] - references[..., 1]
        ref_x = references[..., 0] + 0.5 * ref_w
        ref_y = references[..., 1] + 0.5 * ref_h
        tgt_w = targets[..., 2] - targets[..., 0]
        tgt_h = targets[..., 3] - targets[..., 1]
        tgt_x = targets[..., 0] + 0.5 * tgt_w
        tgt_y = targets[..., 1] + 0.5 * tgt_h
        return torch.stack((
            wx * (tgt_x - ref_x) / ref_w,
            wy * (tgt_y - ref_y) / ref_h,
            ww * torch.log(tgt_w / ref_w),
            wh * torch.log(tgt_h / ref_h),
        ), dim=-1)

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """Boxes ``(..., 4)`` from deltas ``(..., 4)`` applied to ``references`` (broadcast)."""
        references = references.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = references[..., 2] - references[..., 0]
        ref_h = references[..., 3] - references[..., 1]
        ref_x = references[..., 0] + 0.5 * ref_w
        ref_y = references[..., 1] + 0.5 * ref_h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx = dx * ref_w + ref_x
        cy = dy * ref_h + ref_y
        half_w = 0.5 * (torch.exp(dw) * ref_w)
        half_h = 0.5 * (torch.exp(dh) * ref_h)
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


class LinearBoxCoder:
    """FCOS's box coding: a box as the distances ``(l, t, r, b)`` from the centre of a
    reference box (an anchor point's square) to the box's four sides, in units of the
    reference's width and height (``normalize_by_size``, as both peers' FCOS) or in pixels."""

    def __init__(self, normalize_by_size: bool = True) -> None:
        self.normalize_by_size = bool(normalize_by_size)

    def _centres_and_scale(self, references: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        cx = 0.5 * (references[..., 0] + references[..., 2])
        cy = 0.5 * (references[..., 1] + references[..., 3])
        w, h = box_sizes(references)
        return cx, cy, torch.stack((w, h, w, h), dim=-1)

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """Distances ``(..., 4)`` from the centres of ``references`` ``(..., 4)`` to the sides
        of ``targets`` ``(..., 4)``; negative where a centre lies outside its target."""
        cx, cy, scale = self._centres_and_scale(references)
        dist = torch.stack((cx - targets[..., 0], cy - targets[..., 1],
                            targets[..., 2] - cx, targets[..., 3] - cy), dim=-1)
        return dist / scale if self.normalize_by_size else dist

    def decode(self, distances: Tensor, references: Tensor) -> Tensor:
        """Boxes ``(..., 4)`` xyxy from ``distances`` ``(..., 4)`` around the centres of
        ``references`` (broadcast)."""
        references = references.to(distances.dtype)
        cx, cy, scale = self._centres_and_scale(references)
        if self.normalize_by_size:
            distances = distances * scale
        return torch.stack((cx - distances[..., 0], cy - distances[..., 1],
                            cx + distances[..., 2], cy + distances[..., 3]), dim=-1)


def clip_boxes(boxes: Tensor, limits: Tensor) -> Tensor:
    """Clamp ``boxes`` ``(..., 4)`` to ``[0, w] x [0, h]``; ``limits`` broadcasts against the
    boxes and holds ``(w, h, w, h)`` in its last dimension."""
    return torch.minimum(boxes.clamp(min=0), limits.to(boxes.dtype))


def split_per_image(values: Tensor, image_idx: Tensor, num_images: int) -> List[Tensor]:
    """Split ``values`` ``(M, ...)``, grouped by ``image_idx`` ``(M,)`` in increasing order,
    into one tensor per image."""
    if num_images == 1:
        return [values]
    return list(values.split(torch.bincount(image_idx, minlength=num_images).tolist()))


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group: indices ``(K,)`` of the kept ``boxes`` ``(M, 4)``, by decreasing
    score. Eager mode uses torchvision's (a loop over groups for large M on CPU); a traced
    graph shifts each group's boxes apart and runs one NMS, without torchvision's branch for
    empty input (OpenVINO 2026.4 answers that branch with one spurious index)."""
    if not is_tracing():
        return tv_batched_nms(boxes, scores, groups, iou_threshold)
    # max over the coordinates and a zero: defined for empty input too
    span = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max() + 1
    return nms(boxes + (groups.to(boxes) * span)[:, None], scores, iou_threshold)


def box_sizes(boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """Widths and heights ``(...)`` of ``boxes`` ``(..., 4)``."""
    return boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]


def size_limits(image_sizes: Sequence[Tuple[Size, Size]], like: Tensor) -> Tensor:
    """``(N, 4)`` tensor of ``(w, h, w, h)`` for ``image_sizes`` given as ``(h, w)`` (ints, or
    traced sizes)."""
    flat = [v for h, w in image_sizes for v in (w, h, w, h)]
    return size_tensor(flat, dtype=like.dtype, device=like.device).view(-1, 4)


def top_k_per_group(group: Tensor, num_groups: int, k: int) -> Tensor:
    """Indices into ``group`` ``(M,)`` (already sorted by decreasing score) of the first ``k``
    elements of each group, ordered by group then by score. ``group`` holds ints in
    ``[0, num_groups)``."""
    if num_groups == 1:  # one image: the first k (also what a traced single-image graph needs)
        return torch.arange(group.shape[0], device=group.device)[:k]
    order = torch.sort(group, stable=True).indices
    sorted_group = group[order]
    counts = torch.bincount(sorted_group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.numel(), device=group.device) - starts[sorted_group]
    return order[rank < k]


def select_detections(boxes: Tensor, scores: Tensor, labels: Tensor,
                      image_sizes: Sequence[Tuple[Size, Size]], *, num_classes: int,
                      score_thresh: float, nms_thresh: float,
                      detections_per_image: int) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """A one-stage detector's last step over its per-image candidates (``boxes`` ``(N, C,
    4)``, ``scores`` and ``labels`` ``(N, C)``): boxes clipped to the images, scores above
    ``score_thresh``, per-class NMS, the best ``detections_per_image`` of each image ->
    per image ``(boxes, scores, labels)``, by decreasing score."""
    n = len(image_sizes)
    boxes = clip_boxes(boxes, size_limits(image_sizes, boxes)[:, None, :]).reshape(-1, 4)
    image_idx = torch.arange(n, device=scores.device)[:, None].expand_as(scores).reshape(-1)
    scores, labels = scores.reshape(-1), labels.reshape(-1)
    valid = torch.nonzero(scores > score_thresh).squeeze(1)
    keep = valid[batched_nms(boxes[valid], scores[valid],
                             image_idx[valid] * num_classes + labels[valid], nms_thresh)]
    keep = keep[top_k_per_group(image_idx[keep], n, detections_per_image)]
    return list(zip(*(split_per_image(v[keep], image_idx[keep], n)
                      for v in (boxes, scores, labels))))
