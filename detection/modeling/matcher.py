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


class ATSSMatcher:
    """Adaptive training sample selection (Zhang et al., CVPR 2020), for one-stage detectors.

    For each ground-truth box: on every level the ``topk`` anchors whose centres are nearest
    to its centre are candidates; its IoU threshold is the mean plus the standard deviation
    of the candidates' IoUs; candidates at or above it whose centre lies inside the box are
    foreground. An anchor claimed by several boxes goes to the one it overlaps most. All
    other anchors are background (none ignored). mmdetection's ``ATSSAssigner`` does the
    same; RetinaNet with it is mmdetection's ``atss`` with the RetinaNet head.
    """

    def __init__(self, topk: int = 9) -> None:
        if topk < 1:
            raise ValueError(f"ATSS needs topk >= 1, got {topk}")
        self.topk = int(topk)

    def __call__(self, gt: Tensor, anchors: Tensor, num_per_level: Sequence[int],
                 iou: Tensor) -> Tuple[Tensor, Tensor]:
        """``gt`` ``(G, 4)``, ``anchors`` ``(P, 4)`` (levels concatenated, ``num_per_level``
        each), ``iou`` their ``(G, P)`` IoU -> (matched gt index ``(P,)``, label ``(P,)``
        int8 in {1, 0}), as ``Matcher``."""
        num_preds = anchors.shape[0]
        zeros = torch.zeros(num_preds, dtype=torch.int64, device=anchors.device)
        if gt.shape[0] == 0:
            return zeros, zeros.to(torch.int8)
        gt_ctr = (gt[:, :2] + gt[:, 2:]) / 2
        anc_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
        dist = torch.cdist(gt_ctr, anc_ctr)  # [G, P]
        candidates, start = [], 0
        for count in num_per_level:
            k = min(self.topk, count)
            near = dist[:, start:start + count].topk(k, dim=1, largest=False).indices
            candidates.append(near + start)
            start += count
        cand = torch.cat(candidates, dim=1)  # [G, C]
        cand_iou = iou.gather(1, cand)
        std = cand_iou.std(dim=1, keepdim=True) if cand.shape[1] > 1 else 0.0
        thresh = cand_iou.mean(dim=1, keepdim=True) + std
        c = anc_ctr[cand]  # [G, C, 2]
        inside = ((c - gt[:, None, :2]).min(dim=2).values > 0.01) & \
            ((gt[:, None, 2:] - c).min(dim=2).values > 0.01)
        chosen = torch.zeros_like(iou, dtype=torch.bool)
        chosen.scatter_(1, cand, (cand_iou >= thresh) & inside)
        best, matched = torch.where(chosen, iou, torch.full_like(iou, -1.0)).max(dim=0)
        labels = (best >= 0).to(torch.int8)  # FOREGROUND where claimed, else BACKGROUND
        return matched, labels
