"""Fast R-CNN heads on proposals: RoI pooling, a box head, classification and class-specific
box regression, for FPN (``StandardROIHeads``) and C4 (``Res5BoxHead`` inside the same
class, as detectron2's Res5ROIHeads).

Mask heads plug in through ``mask_head`` (see ``MaskHead``), keypoint heads through
``keypoint_head`` (the same protocol, setting ``keypoints``); nothing here needs rewriting.
"""

from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from backbones.fpn import ConvNorm
from backbones.fused import apply_relu

from .box_ops import (
    BoxCoder,
    batched_nms,
    box_sizes,
    clip_boxes,
    size_limits,
    split_per_image,
    top_k_per_group,
)
from .matcher import Matcher, sample_balanced
from .poolers import ROIPooler
from .structures import Detections, SampledProposals


class MaskHead(Protocol):
    """What ``StandardROIHeads`` expects of an optional mask head (Mask R-CNN).

    ``loss`` runs in training on the foreground RoIs of the sampled proposals and returns
    its losses; ``targets`` are the (resized) per-image target dicts, e.g. with ``masks``.
    ``predict`` runs at inference on the final boxes and returns the same detections with
    ``masks`` set, in the coordinates of the resized image.
    """

    def loss(self, features: Dict[str, Tensor], sampled: SampledProposals,
             targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]: ...

    def predict(self, features: Dict[str, Tensor],
                detections: List[Detections]) -> List[Detections]: ...


def conv_stack(in_channels: int, dims: Sequence[int], norm: str) -> nn.ModuleList:
    """3x3 convs (each with an optional norm; the caller applies ReLU) of the box and mask
    heads, He-initialised for the ReLUs that follow them."""
    convs = nn.ModuleList()
    for dim in dims:
        convs.append(ConvNorm(in_channels, dim, 3, norm))
        nn.init.kaiming_normal_(convs[-1].conv.weight, mode="fan_out", nonlinearity="relu")
        in_channels = dim
    return convs


class FastRCNNConvFCHead(nn.Module):
    """``len(conv_dims)`` 3x3 convs (each conv, optional norm, ReLU), flatten, then
    ``len(fc_dims)`` fully connected layers with ReLU. ``(R, C, S, S)`` -> ``(R, D)``."""

    relu_layers = ("convs", "fcs")  # inference fusion (detection.optimize)

    def __init__(self, *, in_channels: int, resolution: int, conv_dims: Sequence[int] = (),
                 fc_dims: Sequence[int] = (1024, 1024), norm: str = "none") -> None:
        super().__init__()
        self.convs = conv_stack(in_channels, conv_dims, norm)
        in_channels = conv_dims[-1] if conv_dims else in_channels
        size = in_channels * resolution * resolution
        self.flat_shape = (in_channels, resolution, resolution)
        self.flatten_channels_last = False
        self.fcs = nn.ModuleList()
        for dim in fc_dims:
            fc = nn.Linear(size, dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            self.fcs.append(fc)
            size = dim
        self.out_dim = size

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = apply_relu(conv, x)
        # (S, S, C) order: a view of channels-last RoI features (see use_channels_last)
        x = x.permute(0, 2, 3, 1).flatten(1) if self.flatten_channels_last else x.flatten(1)
        for fc in self.fcs:
            x = apply_relu(fc, x)
        return x


    def use_channels_last(self) -> None:
        """Inference: flatten the features in (S, S, C) order, the first fc's weight columns
        permuted to match, so that channels-last RoI features (the CPU RoIAlign's) flatten
        without a copy. The same function; other layouts are copied into that order."""
        if self.flatten_channels_last or not self.fcs:
            return
        fc = self.fcs[0]
        w = fc.weight.detach()
        fc.weight.data = (w.view(w.shape[0], *self.flat_shape).permute(0, 2, 3, 1)
                          .reshape(w.shape[0], -1).contiguous())
        self.flatten_channels_last = True


class Res5BoxHead(nn.Module):
    """The C4 box head: res5 on 14x14 pooled res4 features, then global average pooling.
    ``(R, 1024, 14, 14)`` -> ``(R, 2048)``."""

    def __init__(self, res5: nn.Sequential, out_dim: int) -> None:
        super().__init__()
        self.res5 = res5
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x).mean(dim=(2, 3))


class FastRCNNPredictor(nn.Module):
    """``cls_score``: K + 1 logits, background last; ``bbox_pred``: 4 deltas per foreground
    class, ``(R, K * 4)``, or with ``class_agnostic`` 4 for every class, ``(R, 4)``."""

    def __init__(self, in_dim: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__()
        self.num_classes, self.class_agnostic = num_classes, class_agnostic
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, 4 if class_agnostic else num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class StandardROIHeads(nn.Module):
    """Sample proposals, pool, classify and regress; at inference, score filtering, per-class
    NMS and top-k per image, all batched over the images.

    Args:
        in_features: feature maps to pool from (one for C4).
        pooler, box_head, box_predictor: built parts.
        num_classes: K, foreground classes.
        box_coder: (10, 10, 5, 5) weights.
        matcher: IoU 0.5 foreground / background.
        batch_size_per_image, positive_fraction: RoI sampling in training.
        proposal_append_gt: add the ground-truth boxes to the proposals in training.
        smooth_l1_beta: 0 for L1 (detectron2); torchvision uses 1/9.
        score_thresh, nms_thresh, detections_per_image: inference.
        min_box_size: drop detections narrower or shorter than it (torchvision 1e-2; 0 off).
        mask_head: optional, see ``MaskHead``.
        keypoint_head: optional, the same protocol (``keypoint_head.KeypointRCNNHead``).
    """

    def __init__(
        self, *, in_features: Sequence[str], pooler: ROIPooler, box_head: nn.Module,
        box_predictor: FastRCNNPredictor, num_classes: int, box_coder: BoxCoder,
        matcher: Matcher, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
        proposal_append_gt: bool = True, smooth_l1_beta: float = 0.0,
        score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
        min_box_size: float = 0.0, mask_head: Optional[nn.Module] = None,
        keypoint_head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.in_features = list(in_features)
        self.pooler, self.box_head, self.box_predictor = pooler, box_head, box_predictor
        self.num_classes = num_classes
        self.box_coder, self.matcher = box_coder, matcher
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.proposal_append_gt, self.smooth_l1_beta = proposal_append_gt, smooth_l1_beta
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_image, self.min_box_size = detections_per_image, min_box_size
        self.mask_head = mask_head
        self.keypoint_head = keypoint_head

    def forward(
        self, features: Dict[str, Tensor], proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]], targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Detections], Dict[str, Tensor]]:
        """proposals per image ``(R_i, 4)`` -> (detections per image in resized-image
        coordinates (empty in training), losses (empty at inference))."""
        feats = [features[f] for f in self.in_features]
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training")
            sampled = self.sample(proposals, targets)
            logits, deltas = self._predict(feats, sampled.boxes)
            losses = self.box_losses(logits, deltas, sampled, targets)
            if self.mask_head is not None:
                losses.update(self.mask_head.loss(features, sampled, targets))
            if self.keypoint_head is not None:
                losses.update(self.keypoint_head.loss(features, sampled, targets))
            return [], losses
        logits, deltas = self._predict(feats, proposals)
        detections = self.inference(logits, deltas, proposals, image_sizes)
        if self.mask_head is not None:
            detections = self.mask_head.predict(features, detections)
        if self.keypoint_head is not None:
            detections = self.keypoint_head.predict(features, detections)
        return detections, {}

    def _predict(self, feats: List[Tensor], boxes: List[Tensor]) -> Tuple[Tensor, Tensor]:
        x = self.box_head(self.pooler(feats, boxes))
        return self.box_predictor(x.flatten(1))

    @torch.no_grad()
    def sample(self, proposals: List[Tensor],
               targets: List[Dict[str, Tensor]]) -> SampledProposals:
        """Match proposals (plus ground truth) to targets and sample a balanced set."""
        boxes, labels, matched_gt = [], [], []
        for props, t in zip(proposals, targets):
            gt = t["boxes"].to(props.dtype)
            if self.proposal_append_gt:
                props = torch.cat([props, gt])
            matched, match_labels = self.matcher(box_iou(gt, props))
            pos, neg = sample_balanced(match_labels, self.batch_size_per_image,
                                       self.positive_fraction)
            idx = torch.cat([pos, neg])
            cls = torch.full((idx.numel(),), self.num_classes, dtype=torch.int64,
                             device=props.device)
            if gt.shape[0] > 0:
                cls[: pos.numel()] = t["labels"].to(props.device)[matched[pos]]
            boxes.append(props[idx])
            labels.append(cls)
            matched_gt.append(matched[idx])
        return SampledProposals(boxes=boxes, labels=labels, matched_gt=matched_gt)

    def box_losses(self, logits: Tensor, deltas: Tensor, sampled: SampledProposals,
                   targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """CE over all sampled RoIs; smooth-L1 of the true class's deltas over foreground
        RoIs, summed and divided by the number of sampled RoIs."""
        labels = torch.cat(sampled.labels)
        loss_cls = F.cross_entropy(logits, labels)
        fg = torch.nonzero(labels < self.num_classes).squeeze(1)
        gt_boxes = [t["boxes"].to(b.dtype)[m] if t["boxes"].shape[0] else b
                    for t, b, m in zip(targets, sampled.boxes, sampled.matched_gt)]
        reg_targets = self.box_coder.encode(torch.cat(gt_boxes)[fg],
                                            torch.cat(sampled.boxes)[fg])
        fg_deltas = deltas.view(deltas.shape[0], -1, 4)[fg, labels[fg]]
        loss_box = F.smooth_l1_loss(fg_deltas, reg_targets, beta=self.smooth_l1_beta,
                                    reduction="sum") / max(labels.numel(), 1)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box}

    @torch.no_grad()
    def inference(self, logits: Tensor, deltas: Tensor, proposals: List[Tensor],
                  image_sizes: List[Tuple[int, int]]) -> List[Detections]:
        """logits ``(R, K + 1)``, deltas ``(R, K * 4)`` for the concatenated proposals."""
        k = self.num_classes
        props = torch.cat(proposals)
        boxes = self.box_coder.decode(deltas.view(-1, k, 4), props[:, None, :])  # [R, K, 4]
        scores = F.softmax(logits, dim=-1)[:, :k]  # [R, K]
        return self.select_detections(boxes, scores, proposals, image_sizes)

    @torch.no_grad()
    def select_detections(self, boxes: Tensor, scores: Tensor, proposals: List[Tensor],
                          image_sizes: List[Tuple[int, int]]) -> List[Detections]:
        """Boxes ``(R, K, 4)`` (or ``(R, 1, 4)``, one box for every class) and foreground
        scores ``(R, K)`` of the concatenated ``proposals`` -> detections per image: boxes
        clipped, score threshold, minimum size, per-class NMS, top-k per image."""
        n, k = len(proposals), self.num_classes
        image_idx = torch.cat([torch.full_like(p[:, 0], i, dtype=torch.int64)
                               for i, p in enumerate(proposals)])  # [R]
        boxes = clip_boxes(boxes, size_limits(image_sizes, boxes)[image_idx][:, None, :])
        boxes = boxes.expand(-1, k, 4)  # [R, K, 4]
        labels = torch.arange(k, device=scores.device)[None].expand_as(scores).reshape(-1)
        image_idx = image_idx[:, None].expand_as(scores).reshape(-1)
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        keep = scores > self.score_thresh
        if self.min_box_size > 0:
            w, h = box_sizes(boxes)
            keep = keep & (w >= self.min_box_size) & (h >= self.min_box_size)
        keep = torch.nonzero(keep).squeeze(1)
        keep = keep[batched_nms(boxes[keep], scores[keep], image_idx[keep] * k + labels[keep],
                                self.nms_thresh)]
        keep = keep[top_k_per_group(image_idx[keep], n, self.detections_per_image)]
        image_idx = image_idx[keep]
        return [Detections(boxes=b, scores=s, labels=lb) for b, s, lb in zip(
            split_per_image(boxes[keep], image_idx, n), split_per_image(scores[keep], image_idx, n),
            split_per_image(labels[keep], image_idx, n))]
