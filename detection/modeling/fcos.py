"""FCOS (Tian et al., ICCV 2019): a one-stage, anchor-free detector on FPN levels P3-P7.

Every location of every level is a point: the centre of a square as wide as the level's
stride (8..128). Two towers of ``num_convs`` 3x3 convs (GroupNorm, ReLU), shared by all
levels, predict per point ``K`` class logits, the distances ``(l, t, r, b)`` from the point to
the box's sides (ReLU'd, in units of the square's size) and a centerness logit.

Training labels a point with the smallest ground-truth box that holds it, whose centre lies
within ``center_sampling_radius`` squares of it, and whose largest distance from it is in the
level's range (4 to 8 squares; P3 from 0, P7 without bound); every other point is
background. The losses: a sigmoid focal loss over all points and classes, a GIoU loss of the
decoded boxes and a BCE of the centerness (``sqrt(min(l, r) / max(l, r) * min(t, b) /
max(t, b))`` of the target box) over the foreground points, each summed over the batch and
divided by its foreground count. Inference scores a (point, class) by
``sqrt(sigmoid(class logit) * sigmoid(centerness logit))``, keeps per level the top 1000
scores above 0.2, decodes and clips their boxes and runs a per-class NMS.

The model owns its preprocessing (as ``RetinaNet``): ``model(images)`` takes RGB ``(3, H, W)``
images on a 0-255 scale and returns per image ``boxes`` ``(N, 4)`` xyxy in input pixels,
``scores`` and ``labels`` in 0..K-1.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

from backbones.fpn import ConvNorm
from backbones.fused import apply_relu

from .anchors import AnchorGenerator
from .box_ops import (
    LinearBoxCoder,
    select_detections,
)
from .metadata import Metadata
from .preprocess import Preprocessor, detector_inputs, in_input_pixels
from .structures import Detections
from .tracing import min_size

BOX_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss,
              "ciou": complete_box_iou_loss}


class FCOSHead(nn.Module):
    """The classification and box towers, shared by all levels.

    Parameters: ``cls_convs.{i}.conv/.norm`` and ``box_convs.{i}.conv/.norm`` (3x3,
    ``in_channels`` wide, biased conv, then the norm, then a ReLU), ``cls_score`` (3x3, ``K``
    logits), ``bbox_pred`` (3x3, 4 distances, ReLU'd) and ``ctrness`` (3x3, one logit), the
    last two on the box tower.

    Init as both peers: normal(std 0.01) conv weights, zero biases, and the class logits' bias
    at ``-log((1 - prior_prob) / prior_prob)``.
    """

    relu_layers = ("cls_convs", "box_convs", "bbox_pred")  # inference fusion (detection.optimize)
    plain_layers = ("cls_score", "ctrness")  # fused too, so that Winograd takes them

    def __init__(self, *, in_channels: int, num_classes: int, num_convs: int = 4,
                 norm: str = "GN", prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_convs = nn.ModuleList(ConvNorm(in_channels, in_channels, 3, norm, bias=True)
                                       for _ in range(num_convs))
        self.box_convs = nn.ModuleList(ConvNorm(in_channels, in_channels, 3, norm, bias=True)
                                       for _ in range(num_convs))
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _tower(convs: nn.ModuleList, x: Tensor) -> Tensor:
        for block in convs:
            x = apply_relu(block, x)
        return x

    def forward(self, features: Sequence[Tensor]
                ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """features ``(N, C, H_l, W_l)`` -> per level class logits ``(N, H_l*W_l, K)``,
        distances ``(N, H_l*W_l, 4)`` (non-negative, in units of the level's square) and
        centerness logits ``(N, H_l*W_l)``, ordered by location (row-major)."""
        logits, distances, centerness = [], [], []
        for x in features:
            n, _, h, w = x.shape
            c = self.cls_score(self._tower(self.cls_convs, x))  # [N, K, H, W]
            box_features = self._tower(self.box_convs, x)
            d = apply_relu(self.bbox_pred, box_features)  # [N, 4, H, W]
            ctr = self.ctrness(box_features)  # [N, 1, H, W]
            logits.append(c.permute(0, 2, 3, 1).reshape(n, h * w, self.num_classes))
            distances.append(d.permute(0, 2, 3, 1).reshape(n, h * w, 4))
            centerness.append(ctr.reshape(n, h * w))
        return logits, distances, centerness


def _at_least_float32(*tensors: Tensor) -> Tuple[Tensor, ...]:
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


class FCOS(nn.Module):
    """FCOS that owns its preprocessing; see the module docstring for the call.

    Args:
        preprocessor, backbone, head: built parts (the backbone returns at least
            ``in_features``).
        points: the anchor points, one square per location whose size is the level's
            stride (an ``AnchorGenerator`` of one size per level and aspect ratio 1).
        in_features: the feature maps the head runs on (p3..p7).
        box_coder: distances from a point, in units of its square (``normalize_by_size``).
        center_sampling_radius: a point is foreground for a box only if the box's centre lies
            within this many squares of it (1.5 in both peers).
        focal_alpha, focal_gamma: of the sigmoid focal loss.
        box_loss: "giou" (both peers), "diou" or "ciou" on the decoded boxes.
        score_thresh, topk_candidates: per level, the top ``topk_candidates`` (point, class)
            scores above ``score_thresh`` are decoded.
        nms_thresh, detections_per_image: per-class NMS, then the best per image.
        metadata: class names and dataset ids of labels 0..K-1.

    ``detection.optimize.optimize_for_inference`` runs the backbone in bf16 and the head,
    points, decoding and NMS in float32 (``bf16_split``).
    """

    bf16_split = {"backbone": "input", "head": "fp32"}

    def __init__(
        self, *, preprocessor: Preprocessor, backbone: nn.Module, head: FCOSHead,
        points: AnchorGenerator, in_features: Sequence[str], box_coder: LinearBoxCoder,
        center_sampling_radius: float = 1.5, focal_alpha: float = 0.25,
        focal_gamma: float = 2.0, box_loss: str = "giou", score_thresh: float = 0.2,
        topk_candidates: int = 1000, nms_thresh: float = 0.6, detections_per_image: int = 100,
        metadata: Optional[Metadata] = None,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {tuple(BOX_LOSSES)}, got {box_loss!r}")
        if any(a != 1 for a in points.num_anchors):
            raise ValueError(f"FCOS needs one point per location, the generator makes "
                             f"{points.num_anchors} per level")
        if len(points.num_anchors) != len(in_features):
            raise ValueError(f"{len(points.num_anchors)} levels of points for "
                             f"{len(in_features)} feature maps {list(in_features)}")
        self.preprocessor, self.backbone, self.head = preprocessor, backbone, head
        self.points = points
        self.in_features = list(in_features)
        self.box_coder = box_coder
        self.center_sampling_radius = float(center_sampling_radius)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.box_loss = box_loss
        self.score_thresh, self.topk_candidates = float(score_thresh), int(topk_candidates)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_image = int(detections_per_image)
        k = head.num_classes
        self.metadata = metadata or Metadata(class_names=[f"class_{i}" for i in range(k)])
        if self.metadata.num_classes != k:
            raise ValueError(f"metadata names {self.metadata.num_classes} classes but the head "
                             f"predicts {k}")

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def training_states(self) -> Dict[str, object]:
        """No state besides the parameters (the losses are normalized per batch)."""
        return {}

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        batch, sizes, targets = detector_inputs(self, images, targets)
        features = self.backbone(batch)
        feats = [features[f] for f in self.in_features]
        points = self.points(feats, tuple(batch.shape[-2:]))  # per level [H_l*W_l, 4]
        logits, distances, centerness = self.head(feats)
        if self.training:
            assert targets is not None
            return self.losses(points, logits, distances, centerness, targets)
        return in_input_pixels(self.inference(points, logits, distances, centerness, sizes),
                               sizes, images)

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def label_points(self, points: Tensor, num_per_level: Sequence[int],
                     targets: List[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor]:
        """-> (labels ``(N, P)``: class 0..K-1, K for background; matched ground-truth boxes
        ``(N, P, 4)``, meaningful where the label is a class), for ``points`` ``(P, 4)`` (the
        squares of all levels, ``num_per_level`` of each).

        A point takes, among the boxes that hold it (strictly), whose centre is within
        ``center_sampling_radius`` squares of it (in x and in y) and whose largest distance
        from it lies strictly within its level's range, the one of smallest area (the first
        such box on equal areas)."""
        k = self.num_classes
        centres = 0.5 * (points[:, :2] + points[:, 2:])  # [P, 2]
        sizes = points[:, 2] - points[:, 0]  # [P]
        lower = sizes * 4
        lower[: num_per_level[0]] = 0
        upper = sizes * 8
        upper[-num_per_level[-1]:] = float("inf")
        labels, boxes = [], []
        for t in targets:
            gt = t["boxes"].to(points.dtype)  # [M, 4]
            if gt.shape[0] == 0:
                labels.append(torch.full((points.shape[0],), k, dtype=torch.int64,
                                         device=points.device))
                boxes.append(torch.zeros_like(points))
                continue
            gt_centres = 0.5 * (gt[:, :2] + gt[:, 2:])  # [M, 2]
            near = (centres[:, None] - gt_centres[None]).abs().amax(-1) \
                < self.center_sampling_radius * sizes[:, None]  # [P, M]
            dist = torch.cat((centres[:, None] - gt[None, :, :2],
                              gt[None, :, 2:] - centres[:, None]), dim=-1)  # [P, M, 4] l t r b
            reach = dist.amax(-1)
            match = near & (dist.amin(-1) > 0) & (reach > lower[:, None]) & \
                (reach < upper[:, None])
            areas = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])  # [M]
            cost = torch.where(match, areas[None], torch.full_like(reach, float("inf")))
            best, idx = cost.min(dim=1)  # [P]
            lab = t["labels"].to(idx.device)[idx]
            labels.append(torch.where(torch.isinf(best), torch.full_like(lab, k), lab))
            boxes.append(gt[idx])
        return torch.stack(labels), torch.stack(boxes)

    def losses(self, points: List[Tensor], logits: List[Tensor], distances: List[Tensor],
               centerness: List[Tensor], targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        points_t = torch.cat(points)  # [P, 4]
        # [N, P, K], [N, P, 4], [N, P]; at least float32 whatever the head ran in
        logits_t, dist_t, ctr_t = _at_least_float32(
            torch.cat(logits, 1), torch.cat(distances, 1), torch.cat(centerness, 1))
        gt_labels, gt_boxes = self.label_points(points_t, [p.shape[0] for p in points], targets)
        k = self.num_classes
        fg = gt_labels != k  # [N, P]
        num_fg = fg.sum().clamp(min=1).to(logits_t.dtype)
        onehot = F.one_hot(gt_labels, k + 1)[..., :k].to(logits_t.dtype)  # [N, P, K]
        loss_cls = sigmoid_focal_loss(logits_t, onehot, alpha=self.focal_alpha,
                                      gamma=self.focal_gamma, reduction="sum")

        img_idx, pt_idx = torch.nonzero(fg).unbind(1)  # [F] each
        ref, target = points_t[pt_idx], gt_boxes[img_idx, pt_idx]  # [F, 4]
        pred = self.box_coder.decode(dist_t[img_idx, pt_idx], ref)
        loss_box = BOX_LOSSES[self.box_loss](pred, target, reduction="sum")

        ltrb = self.box_coder.encode(target, ref)  # [F, 4]
        lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
        ctr_target = torch.sqrt((lr.amin(-1) / lr.amax(-1)) * (tb.amin(-1) / tb.amax(-1)))
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_t[img_idx, pt_idx], ctr_target,
                                                      reduction="sum")
        return {"loss_cls": loss_cls / num_fg, "loss_box_reg": loss_box / num_fg,
                "loss_centerness": loss_ctr / num_fg}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def inference(self, points: List[Tensor], logits: List[Tensor], distances: List[Tensor],
                  centerness: List[Tensor], image_sizes: List[Tuple[int, int]]
                  ) -> List[Detections]:
        """Per image: per level the top ``topk_candidates`` (point, class) pairs by
        ``sqrt(sigmoid(logit) * sigmoid(centerness))``, those above ``score_thresh`` decoded
        and clipped, a per-class NMS, the best ``detections_per_image``; boxes in the resized
        image's pixels."""
        n, k = len(image_sizes), self.num_classes
        scores, boxes, labels = [], [], []
        for p, lg, d, c in zip(points, logits, distances, centerness):
            score = torch.sqrt(torch.sigmoid(lg) * torch.sigmoid(c)[..., None])  # [N, HW, K]
            flat = score.reshape(n, -1)  # index = point * K + class
            top, idx = flat.topk(min_size(self.topk_candidates, flat.shape[1]), dim=1)
            point_idx = idx // k
            d = torch.gather(d, 1, point_idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(d, p[point_idx]))  # [N, k, 4]
            scores.append(top)
            labels.append(idx % k)
        per_image = select_detections(
            torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1), image_sizes,
            num_classes=k, score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
            detections_per_image=self.detections_per_image)
        return [Detections(boxes=b, scores=s, labels=lab) for b, s, lab in per_image]
