"""Merging instance and semantic predictions into one panoptic segmentation (the heuristic of
Panoptic FPN, as detectron2's ``combine_semantic_and_instance_outputs`` and the COCO panoptic
API's combine script apply it).

1. Instances in decreasing score order, stopping at the first below ``score_thresh``: an
   instance whose mask overlaps pixels already assigned by more than ``overlap_thresh`` of its
   area is dropped; otherwise its unassigned pixels become a new segment.
2. Each stuff label of the semantic argmax (labels 1..S; 0 is the "things" class) over the
   pixels still unassigned becomes a segment if it covers at least ``stuff_area_limit`` pixels.

Segment ids count from 1 in that order; 0 is void (left unassigned).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

__all__ = ["combine_semantic_and_instances"]


def combine_semantic_and_instances(
    *, masks: Tensor, scores: Tensor, labels: Tensor, semantic: Tensor,
    overlap_thresh: float = 0.5, stuff_area_limit: int = 4096, score_thresh: float = 0.5,
) -> Tuple[Tensor, List[Dict[str, Any]]]:
    """
    Args:
        masks: ``(N, H, W)`` bool instance masks in image pixels.
        scores, labels: ``(N,)`` instance scores and contiguous thing classes.
        semantic: ``(H, W)`` semantic labels (argmax of the semantic logits).
        overlap_thresh, stuff_area_limit, score_thresh: see the module doc.

    Returns:
        ``panoptic_seg`` ``(H, W)`` int32 segment ids and ``segments_info``: per segment
        ``id``, ``category_id`` (a thing's class, or a stuff segment's semantic label),
        ``isthing``, ``area`` (pixels), and for things ``score`` and ``instance_id`` (its index
        in the inputs).
    """
    if masks.dim() != 3 or masks.shape[1:] != semantic.shape:
        raise ValueError(f"masks must be (N, H, W) with (H, W) = semantic's "
                         f"{tuple(semantic.shape)}, got {tuple(masks.shape)}")
    panoptic = torch.zeros(semantic.shape, dtype=torch.int32, device=semantic.device)
    segments: List[Dict[str, Any]] = []
    masks = masks.to(device=semantic.device, dtype=torch.bool)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    score_list, label_list = scores.tolist(), labels.tolist()
    for i in order:
        if score_list[i] < score_thresh:
            break
        mask = masks[i]
        area = int(mask.sum())
        if area == 0:
            continue
        taken = mask & (panoptic > 0)
        overlap = int(taken.sum())
        if overlap / area > overlap_thresh:
            continue
        if overlap:
            mask = mask & (panoptic == 0)
            area -= overlap
            if area == 0:
                continue
        panoptic[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": int(label_list[i]),
                         "isthing": True, "score": float(score_list[i]), "area": area,
                         "instance_id": i})
    free = panoptic == 0
    for label in torch.unique(semantic).tolist():
        if label == 0:  # the semantic branch's "things" class
            continue
        mask = (semantic == label) & free
        area = int(mask.sum())
        if area < stuff_area_limit or area == 0:
            continue
        panoptic[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": int(label), "isthing": False,
                         "area": area})
    return panoptic, segments
