"""Pasting RoI mask probabilities (``M x M``, e.g. 28 x 28) into a full image, batched over
the masks, in either peer's convention.

Both conventions resample the mask bilinearly, and bilinear resampling of a grid separates
into a resampling of rows and one of columns. So each convention builds, per mask, a
``(H, M)`` matrix of row weights and a ``(W, M)`` matrix of column weights (zero where the
image pixel lies outside the pasted area) and computes ``rows @ mask @ cols^T``: one batched
matrix product instead of a loop over masks, with the peers' sampling positions reproduced.

- ``"torchvision"`` (``torchvision.models.detection.roi_heads.paste_masks_in_image``): pad
  the mask by one cell on each side, grow the box by the same factor ``(M + 2) / M`` about its
  centre, truncate its corners to integers, bilinearly resize (``align_corners=False``) the
  padded mask to ``(y2 - y1 + 1, x2 - x1 + 1)`` pixels and copy it to the box's pixels.
- ``"detectron2"`` (``detectron2.layers.mask_ops.paste_masks_in_image``): sample the mask at
  every pixel centre ``(x + 0.5, y + 0.5)`` mapped into the box with no rounding, as
  ``grid_sample`` with ``align_corners=False`` and zeros outside the mask.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detection.modeling.tracing import as_size, is_tracing

PASTE_MODES = ("torchvision", "detectron2")


def _linear_weights(pos: Tensor, valid: Tensor, size: int, clamp_low: bool) -> Tensor:
    """Bilinear weights of sample positions ``pos`` ``(N, L)`` (in mask cells, cell centres at
    integers) over ``size`` cells -> ``(N, L, size)``.

    ``clamp_low``: ``F.interpolate``'s rule (negative positions read cell 0, the last cell
    repeats past the end); otherwise ``grid_sample``'s zeros outside the cells.
    """
    if clamp_low:
        pos = pos.clamp(min=0)
    low = torch.floor(pos)
    frac = pos - low
    low = low.to(torch.int64)
    cells = torch.arange(size, device=pos.device)
    high = low + 1
    if clamp_low:  # interpolate: the upper neighbour stays inside; its weight goes to the last
        high = high.clamp(max=size - 1)
    w = (cells == low[..., None]) * (1 - frac)[..., None]
    w = w + (cells == high[..., None]) * frac[..., None]
    return w * valid[..., None]


def _torchvision_weights(boxes: Tensor, size: int, length: int, axis: int) -> Tensor:
    """Weights ``(N, length, size + 2)`` of the padded mask along one image axis (0: x)."""
    scale = (size + 2) / size
    lo, hi = boxes[:, axis], boxes[:, axis + 2]
    centre, half = (hi + lo) * 0.5, (hi - lo) * 0.5 * scale
    start = (centre - half).to(torch.int64)  # truncation toward zero, as .to(int64)
    stop = (centre + half).to(torch.int64)
    extent = (stop - start + 1).clamp(min=1)  # pixels of the resized mask
    pix = torch.arange(length, device=boxes.device)
    dst = pix[None, :] - start[:, None]  # index into the resized mask, (N, length)
    valid = (pix[None, :] >= start[:, None]) & (pix[None, :] <= stop[:, None])
    # F.interpolate(size=...) with align_corners=False: scale in / out computed in float32
    ratio = (size + 2) / extent.to(torch.float32)
    pos = (dst.to(torch.float32) + 0.5) * ratio[:, None] - 0.5
    return _linear_weights(pos, valid, size + 2, clamp_low=True)


def _detectron2_weights(boxes: Tensor, size: int, length: int, axis: int) -> Tensor:
    """Weights ``(N, length, size)`` of the mask along one image axis (0: x)."""
    lo, hi = boxes[:, axis : axis + 1], boxes[:, axis + 2 : axis + 3]
    centres = torch.arange(length, device=boxes.device, dtype=boxes.dtype) + 0.5
    grid = (centres[None, :] - lo) / (hi - lo) * 2 - 1  # grid_sample's [-1, 1] coordinates
    pos = ((grid + 1) * size - 1) / 2
    return _linear_weights(pos, torch.ones_like(pos, dtype=torch.bool), size, clamp_low=False)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], *,
                mode: str = "torchvision") -> Tensor:
    """Paste mask probabilities into images of ``image_size``.

    Args:
        masks: ``(N, M, M)`` or ``(N, 1, M, M)`` probabilities (or logits) per box.
        boxes: ``(N, 4)`` xyxy in the pixels of the target image.
        image_size: ``(H, W)``.
        mode: "torchvision" or "detectron2" (see the module doc).

    Returns:
        ``(N, H, W)`` pasted values in ``masks``' dtype, zero outside each box's area.
    """
    if mode not in PASTE_MODES:
        raise ValueError(f"paste mode must be one of {PASTE_MODES}, got {mode!r}")
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"masks must be (N, M, M) or (N, 1, M, M), got {tuple(masks.shape)}")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be ({masks.shape[0]}, 4), got {tuple(boxes.shape)}")
    h, w = as_size(image_size[0]), as_size(image_size[1])
    n, size = masks.shape[0], int(masks.shape[-1])
    if not is_tracing() and n == 0:
        return masks.new_zeros((0, h, w))
    if mode == "torchvision":
        masks = F.pad(masks, (1, 1, 1, 1))
        cols = _torchvision_weights(boxes, size, w, 0)
        rows = _torchvision_weights(boxes, size, h, 1)
    else:
        cols = _detectron2_weights(boxes, size, w, 0)
        rows = _detectron2_weights(boxes, size, h, 1)
    rows, cols = rows.to(masks.dtype), cols.to(masks.dtype)
    if is_tracing():
        return rows @ masks @ cols.transpose(1, 2)  # [N, H, M'] @ [N, M', M'] @ [N, M', W]
    # Eagerly, each mask's product over just the rows and columns its weights reach (its
    # box): the same sums, without multiplying the zeros of the rest of the image.
    out = masks.new_zeros((n, h, w))
    (r0, r1), (c0, c1) = _reach(rows), _reach(cols)
    for i in range(n):
        if r1[i] > r0[i] and c1[i] > c0[i]:
            out[i, r0[i]:r1[i], c0[i]:c1[i]] = (
                rows[i, r0[i]:r1[i]] @ masks[i] @ cols[i, c0[i]:c1[i]].t())
    return out


def _reach(weights: Tensor):
    """Per mask, the first and one past the last pixel (row or column) with a nonzero weight,
    as lists; ``(0, 0)`` where there is none."""
    hit = (weights != 0).any(dim=2)  # [N, L]
    length = hit.shape[1]
    idx = torch.arange(length, device=hit.device)
    first = torch.where(hit, idx, length).amin(dim=1)
    last = torch.where(hit, idx, -1).amax(dim=1) + 1  # 0 where no pixel is hit
    return torch.minimum(first, last).tolist(), last.tolist()
