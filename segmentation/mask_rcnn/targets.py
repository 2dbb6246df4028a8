"""Mask R-CNN training targets: each ground-truth instance mask cropped to the RoI matched to
it and resized to ``M x M``.

The data mapper turns every COCO segmentation (polygons, compressed or uncompressed RLE) into
a bitmask of the augmented image (``instances["masks"]``, uint8 ``(G, H, W)``), so the targets
are computed from bitmasks only, as the peers do: RoIAlign over the mask itself with the RoI
as the box (bilinear, adaptive sampling). torchvision keeps the soft values at the edges;
detectron2 shifts by half a pixel (aligned) and binarizes at 0.5.
"""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def resize_masks(masks: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of uint8/bool ``(G, H, W)`` masks to ``size`` (h, w), for
    masks given at the input size of an image the model resized."""
    h, w = int(size[0]), int(size[1])
    if tuple(masks.shape[-2:]) == (h, w):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, h, w))
    out = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    return out.to(masks.dtype)


def crop_and_resize(masks: Tensor, boxes: Tensor, matched: Tensor, size: int, *,
                    aligned: bool = False) -> Tensor:
    """Targets of one image.

    Args:
        masks: ``(G, H, W)`` instance bitmasks in the pixels the boxes refer to.
        boxes: ``(R, 4)`` xyxy RoIs.
        matched: ``(R,)`` index of each RoI's instance in ``masks``.
        size: M, the side of the targets.
        aligned: detectron2's convention: RoIAlign with the half-pixel shift, then targets
            binarized at 0.5. False: torchvision's, soft targets without the shift.

    Returns:
        ``(R, M, M)`` float targets in [0, 1].
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    if masks.dim() != 3:
        raise ValueError(f"instance masks must be (G, H, W), got {tuple(masks.shape)}")
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    rois = torch.cat([matched.to(dtype)[:, None], boxes.to(dtype)], dim=1)
    out = roi_align(masks[:, None].to(device=boxes.device, dtype=dtype), rois, (size, size),
                    spatial_scale=1.0, sampling_ratio=-1, aligned=aligned)[:, 0]
    return (out >= 0.5).to(dtype) if aligned else out


def mask_targets(masks: Sequence[Tensor], boxes: Sequence[Tensor], matched: Sequence[Tensor],
                 size: int, *, aligned: bool = False) -> Tensor:
    """:func:`crop_and_resize` over a batch (one RoIAlign per image: the images' masks differ
    in size) -> ``(sum R_i, M, M)``."""
    out: List[Tensor] = [crop_and_resize(m, b, i, size, aligned=aligned)
                         for m, b, i in zip(masks, boxes, matched)]
    return torch.cat(out) if out else torch.zeros((0, size, size))
