"""Small typed containers passed between the parts of a detector."""

from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import Tensor


@dataclass
class Detections:
    """Detections of one image: ``boxes`` ``(N, 4)`` xyxy, ``scores`` ``(N,)``, ``labels``
    ``(N,)`` int64 in 0..K-1, ``masks`` ``(N, 1, H, W)`` when a mask head ran, and
    ``keypoints`` ``(N, P, 3)`` (x, y, 1) with ``keypoints_scores`` ``(N, P)`` when a keypoint
    head ran."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Optional[Tensor] = None
    keypoints: Optional[Tensor] = None
    keypoints_scores: Optional[Tensor] = None

    def to_dict(self) -> Dict[str, Tensor]:
        out = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        if self.masks is not None:
            out["masks"] = self.masks
        if self.keypoints is not None:
            out["keypoints"] = self.keypoints
            out["keypoints_scores"] = self.keypoints_scores
        return out


@dataclass
class SampledProposals:
    """The RoIs a box head trains on, per image (lists of length N).

    ``boxes`` ``(R_i, 4)``: sampled proposals (ground truth appended before sampling);
    ``labels`` ``(R_i,)``: class in 0..K-1, or K for background;
    ``matched_gt`` ``(R_i,)``: index of the matched ground-truth box in the image's target
    (meaningful where ``labels < K``), e.g. for a mask head to pick its mask targets.
    """

    boxes: List[Tensor]
    labels: List[Tensor]
    matched_gt: List[Tensor]
