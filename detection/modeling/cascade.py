"""Cascade R-CNN (Cai and Vasconcelos, 2018) as detectron2 builds it: ``MODEL.ROI_HEADS.NAME:
CascadeROIHeads``.

Stages of Fast R-CNN heads, each with its own box head and predictor, whose class-agnostic box
regression refines the previous stage's boxes:

- stage 0 samples the RPN proposals (ground truth appended) as ``StandardROIHeads`` does, at
  ``MODEL.ROI_HEADS.IOU_THRESHOLDS`` (which must equal the first cascade IoU);
- stage k + 1 takes stage k's regressed boxes (detached, clipped, empty ones dropped in
  training) and in training labels all of them at its own IoU (0.5, 0.6, 0.7 by default),
  without resampling; each stage decodes with its own weights ((10, 10, 5, 5), (20, 20, 10,
  10), (30, 30, 15, 15));
- the losses are summed over stages (``loss_cls_stage{k}``, ``loss_box_reg_stage{k}``), and the
  gradient entering each stage's box head from the pooled features is scaled by
  1 / num_stages, so that the backbone sees the mean of the stages' gradients;
- at inference the class probabilities are averaged over the stages (softmax per stage, then
  the mean), the boxes are the last stage's regression, then score threshold, per-class NMS and
  top-k, as ``StandardROIHeads``.

A mask head (Cascade Mask R-CNN) trains on stage 0's sampled foreground RoIs, as detectron2's
``CascadeROIHeads`` does, and predicts on the final boxes.

Parameter names: ``roi_heads.box_head.{k}.*`` and ``roi_heads.box_predictor.{k}.*``, k the
stage, which are detectron2's names with ``fc1``/``fc2`` as ``fcs.0``/``fcs.1``
(``detection.modeling.convert``).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from .box_ops import BoxCoder, box_sizes, clip_boxes, size_limits
from .matcher import FOREGROUND, Matcher
from .poolers import ROIPooler
from .roi_heads import FastRCNNPredictor, StandardROIHeads
from .structures import Detections, SampledProposals

__all__ = ["CascadeROIHeads", "CascadeStage", "scale_gradient"]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged; the gradient flowing back through it multiplied by ``scale``."""
    return _ScaleGradient.apply(x, scale)


@dataclass
class CascadeStage:
    """What one stage saw and predicted.

    ``boxes``: its input boxes per image ``(R_i, 4)``; ``logits`` ``(R, K + 1)`` and class-
    agnostic ``deltas`` ``(R, 4)`` for the concatenated boxes; in training ``rois``, the same
    boxes with their labels and matched ground truth.
    """

    boxes: List[Tensor]
    logits: Tensor
    deltas: Tensor
    rois: Optional[SampledProposals] = None


class CascadeROIHeads(StandardROIHeads):
    """Cascade R-CNN's RoI heads (see the module docstring).

    Args:
        box_heads, box_predictors, box_coders, stage_ious: one per stage; the predictors
            class-agnostic (``bbox_pred`` of 4 outputs), the coders with the stage's weights,
            the IoU at which the stage's RoIs are foreground (the first is the sampler's).
        (others: as ``StandardROIHeads``; its ``box_head`` and ``box_predictor`` are here the
        ``nn.ModuleList`` of the stages', its ``box_coder`` the last stage's.)
    """

    def __init__(
        self, *, in_features: Sequence[str], pooler: ROIPooler, box_heads: Sequence[nn.Module],
        box_predictors: Sequence[FastRCNNPredictor], box_coders: Sequence[BoxCoder],
        stage_ious: Sequence[float], num_classes: int, batch_size_per_image: int = 512,
        positive_fraction: float = 0.25, proposal_append_gt: bool = True,
        smooth_l1_beta: float = 0.0, score_thresh: float = 0.05, nms_thresh: float = 0.5,
        detections_per_image: int = 100, min_box_size: float = 0.0,
        mask_head: Optional[nn.Module] = None,
    ) -> None:
        counts = {len(box_heads), len(box_predictors), len(box_coders), len(stage_ious)}
        if len(counts) != 1 or not box_heads:
            raise ValueError(f"CascadeROIHeads needs one box head, predictor, box coder and IoU "
                             f"per stage, got {len(box_heads)}, {len(box_predictors)}, "
                             f"{len(box_coders)} and {len(stage_ious)}")
        for k, p in enumerate(box_predictors):
            if p.bbox_pred.out_features != 4:
                raise ValueError(f"CascadeROIHeads regresses class-agnostic boxes: stage {k}'s "
                                 f"bbox_pred gives {p.bbox_pred.out_features} deltas, not 4")
        first = float(stage_ious[0])
        super().__init__(
            in_features=in_features, pooler=pooler, box_head=nn.ModuleList(box_heads),
            box_predictor=nn.ModuleList(box_predictors), num_classes=num_classes,
            box_coder=box_coders[-1],
            matcher=Matcher((first, first), allow_low_quality_matches=False),
            batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
            proposal_append_gt=proposal_append_gt, smooth_l1_beta=smooth_l1_beta,
            score_thresh=score_thresh, nms_thresh=nms_thresh,
            detections_per_image=detections_per_image, min_box_size=min_box_size,
            mask_head=mask_head,
        )
        self.box_coders = list(box_coders)
        self.stage_ious = tuple(float(t) for t in stage_ious)
        self.stage_matchers = [Matcher((t, t), allow_low_quality_matches=False)
                               for t in self.stage_ious]

    @property
    def num_stages(self) -> int:
        return len(self.stage_ious)

    def forward(
        self, features: Dict[str, Tensor], proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]], targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Detections], Dict[str, Tensor]]:
        """proposals per image ``(R_i, 4)`` -> (detections per image in resized-image
        coordinates (empty in training), losses per stage (empty at inference))."""
        if self.training and targets is None:
            raise ValueError("the RoI heads need targets in training")
        stages = self.run_stages(features, proposals, image_sizes, targets)
        if self.training:
            losses: Dict[str, Tensor] = {}
            for k, stage in enumerate(stages):
                for name, value in self.stage_losses(k, stage, targets).items():
                    losses[f"{name}_stage{k}"] = value
            if self.mask_head is not None:
                losses.update(self.mask_head.loss(features, stages[0].rois, targets))
            return [], losses
        detections = self.cascade_inference(stages, image_sizes)
        if self.mask_head is not None:
            detections = self.mask_head.predict(features, detections)
        return detections, {}

    def run_stages(
        self, features: Dict[str, Tensor], proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]], targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> List[CascadeStage]:
        """Every stage's input boxes and predictions. In training stage 0 samples
        ``proposals`` (labelled at the first IoU) and each later stage labels the boxes it
        receives at its own IoU."""
        feats = [features[f] for f in self.in_features]
        stages: List[CascadeStage] = []
        boxes = proposals
        for k in range(self.num_stages):
            rois = None
            if k > 0:
                boxes = self.refine(k - 1, stages[-1], image_sizes)
            if self.training:
                assert targets is not None
                rois = self.sample(boxes, targets) if k == 0 else self.label(k, boxes, targets)
                boxes = rois.boxes
            x = self.pooler(feats, boxes)  # (R, C, S, S)
            if self.training:
                x = scale_gradient(x, 1.0 / self.num_stages)
            logits, deltas = self.box_predictor[k](self.box_head[k](x).flatten(1))
            stages.append(CascadeStage(boxes=boxes, logits=logits, deltas=deltas, rois=rois))
        return stages

    @torch.no_grad()
    def refine(self, k: int, stage: CascadeStage,
               image_sizes: List[Tuple[int, int]]) -> List[Tensor]:
        """Stage ``k``'s regressed boxes per image ``(R_i, 4)``, detached and clipped to the
        image: the next stage's proposals. In training boxes of zero width or height are
        dropped; at inference all are kept, so that the stages' scores stay aligned."""
        props = torch.cat(stage.boxes)
        boxes = self.box_coders[k].decode(stage.deltas.detach().to(props.dtype), props)
        per_image = [boxes] if len(stage.boxes) == 1 else \
            boxes.split([b.shape[0] for b in stage.boxes])  # one image: traced sizes
        limits = size_limits(image_sizes, boxes)  # [N, 4]
        out = []
        for b, lim in zip(per_image, limits):
            b = clip_boxes(b, lim)
            if self.training:
                w, h = box_sizes(b)
                b = b[(w > 0) & (h > 0)]
            out.append(b)
        return out

    @torch.no_grad()
    def label(self, k: int, boxes: List[Tensor],
              targets: List[Dict[str, Tensor]]) -> SampledProposals:
        """All of ``boxes`` labelled at stage ``k``'s IoU: the matched ground truth's class
        where the IoU reaches it, else background (K); nothing is sampled."""
        labels, matched_gt = [], []
        for b, t in zip(boxes, targets):
            gt = t["boxes"].to(b.dtype)
            matched, match_labels = self.stage_matchers[k](box_iou(gt, b))
            cls = torch.full_like(matched, self.num_classes)
            if gt.shape[0] > 0:
                fg = match_labels == FOREGROUND
                cls[fg] = t["labels"].to(b.device)[matched[fg]]
            labels.append(cls)
            matched_gt.append(matched)
        return SampledProposals(boxes=list(boxes), labels=labels, matched_gt=matched_gt)

    def stage_losses(self, k: int, stage: CascadeStage,
                     targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Stage ``k``'s cross-entropy over its RoIs and smooth-L1 of its class-agnostic deltas
        over the foreground ones, summed and divided by the number of RoIs."""
        rois = stage.rois
        assert rois is not None, "stage losses need the labelled RoIs of training"
        labels = torch.cat(rois.labels)
        if labels.numel() == 0:
            zero = stage.logits.sum() * 0.0 + stage.deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box_reg": zero}
        loss_cls = F.cross_entropy(stage.logits, labels)
        fg = torch.nonzero(labels < self.num_classes).squeeze(1)
        gt_boxes = [t["boxes"].to(b.dtype)[m] if t["boxes"].shape[0] else b
                    for t, b, m in zip(targets, rois.boxes, rois.matched_gt)]
        reg_targets = self.box_coders[k].encode(torch.cat(gt_boxes)[fg],
                                                torch.cat(rois.boxes)[fg])
        loss_box = F.smooth_l1_loss(stage.deltas[fg], reg_targets, beta=self.smooth_l1_beta,
                                    reduction="sum") / labels.numel()
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box}

    @torch.no_grad()
    def cascade_inference(self, stages: List[CascadeStage],
                          image_sizes: List[Tuple[int, int]]) -> List[Detections]:
        """Class probabilities averaged over the stages, the last stage's boxes, then
        ``select_detections`` (threshold, per-class NMS, top-k)."""
        probs = [F.softmax(s.logits, dim=-1) for s in stages]
        scores = sum(probs) * (1.0 / len(stages))  # [R, K + 1]
        last = stages[-1]
        props = torch.cat(last.boxes)
        boxes = self.box_coders[-1].decode(last.deltas.to(props.dtype), props)  # [R, 4]
        return self.select_detections(boxes[:, None, :], scores[:, :self.num_classes],
                                      last.boxes, image_sizes)
