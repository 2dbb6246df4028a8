"""Panoptic FPN (Kirillov et al., CVPR 2019): Mask R-CNN and the Semantic FPN branch on one
FPN, trained jointly, with the two outputs merged into a panoptic segmentation at inference."""

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detection.modeling.preprocess import detector_inputs, rescale_boxes
from segmentation.mask_rcnn.model import MaskRCNN
from segmentation.mask_rcnn.paste import paste_masks
from segmentation.mask_rcnn.targets import resize_masks

from .merge import combine_semantic_and_instances

__all__ = ["PanopticFPN"]


class PanopticFPN(MaskRCNN):
    """Mask R-CNN (its parts) plus ``sem_seg_head`` (``SemanticFPNHead`` over p2..p5) on the
    same backbone features.

    Training: ``targets[i]`` as Mask R-CNN's (``boxes``, ``labels``, ``masks``) plus ``sem_seg``
    ``(H_i, W_i)`` int64 (things 0, stuff 1..S, ``ignore_value`` void). Losses: RPN's as they
    are, the RoI heads' (box and mask) times ``instance_loss_weight``, and ``loss_sem_seg``,
    the cross-entropy of the semantic logits upsampled to the padded batch, times
    ``sem_seg_loss_weight`` (detectron2's weighting: 1.0 and 0.5 for COCO).

    Evaluation: per image Mask R-CNN's ``boxes``, ``scores``, ``labels``, ``masks``,
    ``binary_masks``, plus ``sem_seg`` ``(S + 1, H, W)`` logits at the input size and, with
    ``combine``, ``panoptic_seg`` ``(H, W)`` int32 segment ids (0 void) and ``segments_info``
    (see :func:`~segmentation.panoptic.merge.combine_semantic_and_instances`).

    Args:
        sem_seg_head: features -> logits ``(N, S + 1, H / s, W / s)``.
        sem_seg_loss_weight, instance_loss_weight: see above.
        ignore_value: semantic label of void pixels.
        combine: merge into ``panoptic_seg`` at inference.
        overlap_thresh, stuff_area_limit, score_thresh: the merge's options.
        (others: as ``MaskRCNN``)

    In bf16 (``detection.optimize``) the semantic head runs in float32, as the box head does.
    """

    bf16_split = {**MaskRCNN.bf16_split, "sem_seg_head": "fp32"}

    def __init__(self, *, sem_seg_head: nn.Module, sem_seg_loss_weight: float = 0.5,
                 instance_loss_weight: float = 1.0, ignore_value: int = 255,
                 combine: bool = True, overlap_thresh: float = 0.5,
                 stuff_area_limit: int = 4096, score_thresh: float = 0.5, **parts: Any) -> None:
        super().__init__(**parts)
        self.sem_seg_head = sem_seg_head
        self.sem_seg_loss_weight = float(sem_seg_loss_weight)
        self.instance_loss_weight = float(instance_loss_weight)
        self.ignore_value = int(ignore_value)
        self.combine = bool(combine)
        self.overlap_thresh, self.stuff_area_limit = float(overlap_thresh), int(stuff_area_limit)
        self.score_thresh = float(score_thresh)

    def _semantic_logits(self, features: Dict[str, Tensor], size: Sequence[int]) -> Tensor:
        """The semantic head's logits, upsampled bilinearly to the padded batch ``size``."""
        logits = self.sem_seg_head(features)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def _semantic_labels(self, targets: List[Dict[str, Tensor]], sizes, padded) -> Tensor:
        """Targets' ``sem_seg`` at the (resized) image sizes, padded with the ignore value."""
        labels = torch.full((len(targets), *padded), self.ignore_value, dtype=torch.int64,
                            device=self.preprocessor.pixel_mean.device)
        for i, (t, (h, w)) in enumerate(zip(targets, sizes)):
            if "sem_seg" not in t:
                raise KeyError(f"target {i} has no 'sem_seg' map (keys: {sorted(t)}); Panoptic "
                               "FPN trains on panoptic data (a COCO panoptic dataset)")
            sem = t["sem_seg"]
            if tuple(sem.shape) != (h, w):
                sem = resize_masks(sem[None], (h, w))[0]  # the model resized the image
            labels[i, :h, :w] = sem.to(labels.device, torch.int64)
        return labels

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Union[Dict[str, Tensor], List[Dict[str, Any]]]:
        batch, sizes, targets = detector_inputs(self, images, targets)
        features = self.backbone(batch)
        padded = tuple(batch.shape[-2:])
        sem_logits = self._semantic_logits(features, padded)  # [N, S + 1, H, W]
        gt_boxes = [t["boxes"] for t in targets] if targets is not None else None
        proposals, rpn_losses = self.rpn(features, sizes, padded, gt_boxes)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        if self.training:
            labels = self._semantic_labels(targets, sizes, padded)
            loss_sem = F.cross_entropy(sem_logits, labels, ignore_index=self.ignore_value)
            return {**rpn_losses,
                    **{k: v * self.instance_loss_weight for k, v in roi_losses.items()},
                    "loss_sem_seg": loss_sem * self.sem_seg_loss_weight}
        results = []
        for i, (det, (h, w), img) in enumerate(zip(detections, sizes, images)):
            size = (int(img.shape[-2]), int(img.shape[-1]))
            det.boxes = rescale_boxes(det.boxes, (h, w), size)
            res = det.to_dict()
            probs = paste_masks(res["masks"], res["boxes"], size, mode=self.paste_mode)
            res["masks"] = probs[:, None]
            res["binary_masks"] = probs >= self.mask_threshold
            sem = sem_logits[i : i + 1, :, :h, :w]
            if (h, w) != size:
                sem = F.interpolate(sem, size=size, mode="bilinear", align_corners=False)
            res["sem_seg"] = sem[0]
            if self.combine:
                pan, segments = combine_semantic_and_instances(
                    masks=res["binary_masks"], scores=res["scores"], labels=res["labels"],
                    semantic=res["sem_seg"].argmax(0), overlap_thresh=self.overlap_thresh,
                    stuff_area_limit=self.stuff_area_limit, score_thresh=self.score_thresh)
                res["panoptic_seg"], res["segments_info"] = pan, segments
            results.append(res)
        return results
