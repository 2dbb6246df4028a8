"""How far two sets of detections of the same image agree: the measure the exporter prints,
the runtime tests assert and the runtime benchmark reports."""

from dataclasses import dataclass
from typing import Dict

import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass(frozen=True)
class Agreement:
    """``matched`` of the ``reference`` detections (slivers excluded) have a counterpart in
    the candidate's ``candidate`` detections: same label, IoU above the bar and score within
    the tolerance. The max differences are over the matched pairs."""

    reference: int
    candidate: int
    matched: int
    max_box_diff: float
    max_score_diff: float
    max_mask_diff: float
    max_keypoint_diff: float = -1.0  # ``keypoints`` (x, y and the visibility column); -1: none
    max_keypoint_score_diff: float = -1.0  # ``keypoints_scores`` (the heatmap logits)

    @property
    def fraction(self) -> float:
        return self.matched / self.reference if self.reference else 1.0

    def __str__(self) -> str:
        text = (f"{self.matched}/{self.reference} detections matched ({self.fraction:.1%}; "
                f"{self.candidate} found); max |box diff| {self.max_box_diff:.2e} px, "
                f"max |score diff| {self.max_score_diff:.2e}")
        if self.max_mask_diff >= 0:
            text += f", max |mask diff| {self.max_mask_diff:.2e}"
        if self.max_keypoint_diff >= 0:
            text += (f", max |keypoint diff| {self.max_keypoint_diff:.2e} px, max |keypoint "
                     f"score diff| {self.max_keypoint_score_diff:.2e}")
        return text


def compare_detections(reference: Dict[str, Tensor], candidate: Dict[str, Tensor], *,
                       iou: float = 0.99, score_tol: float = 1e-3,
                       min_side: float = 1.0, min_score: float = 0.0,
                       label_offset: int = 0) -> Agreement:
    """Match each reference detection to the candidate detection of the same label (plus
    ``label_offset``, e.g. 1 against torchvision's background-first labels) with the highest
    IoU; it counts when that IoU exceeds ``iou`` and the scores differ by at most
    ``score_tol``. Reference boxes narrower or shorter than ``min_side`` pixels (slivers at the
    image edge, whose IoU flips with sub-pixel shifts) are left out, and so are reference
    detections scoring below ``min_score`` (those within a tolerance of the model's score
    threshold may fall under it in the candidate)."""
    rb, cb = reference["boxes"].float(), candidate["boxes"].float()
    keep = torch.nonzero(((rb[:, 2] - rb[:, 0]) >= min_side)
                         & ((rb[:, 3] - rb[:, 1]) >= min_side)
                         & (reference["scores"] >= min_score)).squeeze(1)
    rb, rs, rl = rb[keep], reference["scores"].float()[keep], reference["labels"][keep]
    n = rb.shape[0]
    if n == 0 or cb.shape[0] == 0:
        return Agreement(n, cb.shape[0], 0, 0.0, 0.0, -1.0)
    ious = box_iou(rb, cb) * (rl[:, None] == candidate["labels"][None] + label_offset)
    best_iou, best = ious.max(dim=1)
    score_diff = (rs - candidate["scores"].float()[best]).abs()
    ok = (best_iou > iou) & (score_diff <= score_tol)
    pairs = torch.nonzero(ok).squeeze(1)
    box_diff = (rb[pairs] - cb[best[pairs]]).abs()
    mask_diff = -1.0
    if "masks" in reference and "masks" in candidate and pairs.numel():
        mask_diff = float((reference["masks"][keep][pairs].float()
                           - candidate["masks"][best[pairs]].float()).abs().max())
    keypoint_diff = keypoint_score_diff = -1.0
    if "keypoints" in reference and "keypoints" in candidate and pairs.numel():
        keypoint_diff = float((reference["keypoints"][keep][pairs].float()
                               - candidate["keypoints"][best[pairs]].float()).abs().max())
        keypoint_score_diff = float((reference["keypoints_scores"][keep][pairs].float()
                                     - candidate["keypoints_scores"][best[pairs]].float()
                                     ).abs().max())
    return Agreement(
        reference=n, candidate=cb.shape[0], matched=int(ok.sum()),
        max_box_diff=float(box_diff.max()) if pairs.numel() else 0.0,
        max_score_diff=float(score_diff[pairs].max()) if pairs.numel() else 0.0,
        max_mask_diff=mask_diff, max_keypoint_diff=keypoint_diff,
        max_keypoint_score_diff=keypoint_score_diff,
    )
