"""Assigning ground-truth boxes to anchors or proposals, and balanced sampling."""

from typing import Sequence, Tuple

import torch
from torch import Tensor

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


class Matcher:
    """Match each prediction to its best ground-truth box by IoU.

    A prediction whose best IoU is ``>= thresholds[1]`` is foreground, ``< thresholds[0]``
    background, in between ignored. With ``allow_low_quality_matches`` every ground-truth
    box's best-overlapping predictions (ties included) become foreground too, as the RPN of
    Faster R-CNN does.
    """

    def __init__(self, thresholds: Sequence[float], allow_low_quality_matches: bool) -> None:
        if len(thresholds) != 2 or thresholds[0] > thresholds[1]:
            raise ValueError(f"Matcher needs thresholds (low, high) with low <= high, "
                             f"got {tuple(thresholds)}")
        self.low, self.high = float(thresholds[0]), float(thresholds[1])
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tuple[Tensor, Tensor]:
        """``iou`` ``(G, P)`` -> (matched gt index ``(P,)`` int64, label ``(P,)`` int8 in
        {1, 0, -1}). With ``G == 0`` everything is background (matched index 0)."""
        num_preds = iou.shape[1]
        if iou.shape[0] == 0:
            zeros = torch.zeros(num_preds, dtype=torch.int64, device=iou.device)
            return zeros, zeros.to(torch.int8)
        best_iou, matched = iou.max(dim=0)
        labels = torch.full((num_preds,), IGNORE, dtype=torch.int8, device=iou.device)
        labels[best_iou < self.low] = BACKGROUND
        labels[best_iou >= self.high] = FOREGROUND
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values  # [G, 1]
            is_best = (iou == best_per_gt) & (best_per_gt > 0)
            labels[is_best.any(dim=0)] = FOREGROUND
        return matched, labels


def sample_balanced(
    labels: Tensor, batch_size: int, positive_fraction: float
) -> Tuple[Tensor, Tensor]:
    """Random foreground and background indices from ``labels`` ``(P,)`` (1/0/-1): at most
    ``batch_size * positive_fraction`` foreground, background filling the rest."""
    positive = torch.nonzero(labels == FOREGROUND).squeeze(1)
    negative = torch.nonzero(labels == BACKGROUND).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    pos = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    return pos, neg
