"""Region Proposal Network: objectness and box deltas on every anchor, top-k and NMS."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from backbones.fused import apply_relu

from .anchors import AnchorGenerator
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
from .tracing import min_size

LOSS_NORMALIZERS = ("sampled", "batch")


class RPNHead(nn.Module):
    """``num_convs`` 3x3 convs with ReLU shared by all levels, then 1x1 convs giving ``A``
    objectness logits and ``4A`` box deltas per location."""

    relu_layers = ("convs",)  # inference fusion (detection.optimize)

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_convs)
        )
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """features ``(N, C, H_l, W_l)`` -> logits ``(N, A, H_l, W_l)``, deltas
        ``(N, 4A, H_l, W_l)`` per level."""
        logits, deltas = [], []
        for x in features:
            for conv in self.convs:
                x = apply_relu(conv, x)
            logits.append(self.objectness(x))
            deltas.append(self.deltas(x))
        return logits, deltas


class RPN(nn.Module):
    """Proposals from anchors (Ren et al., 2015), with the options in which torchvision and
    detectron2 differ.

    Args:
        in_features: names of the feature maps to use.
        head, anchor_generator: built parts.
        box_coder: anchor-delta coding (weights (1, 1, 1, 1)).
        matcher: anchor matching (IoU 0.3 / 0.7 with low-quality matches).
        batch_size_per_image, positive_fraction: anchor sampling for the loss.
        pre_nms_topk: (train, test) proposals kept per level and image before NMS.
        post_nms_topk: (train, test) proposals kept per image after NMS.
        nms_thresh: IoU threshold of the NMS, run per image and level.
        min_box_size: proposals need width and height above it (after clipping).
        smooth_l1_beta: 0 gives L1 (detectron2); torchvision uses 1/9.
        loss_normalizer: "sampled" divides both losses by the number of sampled anchors in
            the batch, the objectness loss being a mean (torchvision); "batch" divides the
            sums by images x batch_size_per_image (detectron2).
    """

    def __init__(
        self, *, in_features: Sequence[str], head: RPNHead, anchor_generator: AnchorGenerator,
        box_coder: BoxCoder, matcher: Matcher, batch_size_per_image: int = 256,
        positive_fraction: float = 0.5, pre_nms_topk: Tuple[int, int] = (2000, 1000),
        post_nms_topk: Tuple[int, int] = (1000, 1000), nms_thresh: float = 0.7,
        min_box_size: float = 0.0, smooth_l1_beta: float = 0.0,
        loss_normalizer: str = "batch", loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if loss_normalizer not in LOSS_NORMALIZERS:
            raise ValueError(f"loss_normalizer must be one of {LOSS_NORMALIZERS}, "
                             f"got {loss_normalizer!r}")
        self.in_features = list(in_features)
        self.head, self.anchor_generator = head, anchor_generator
        self.box_coder, self.matcher = box_coder, matcher
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.pre_nms_topk, self.post_nms_topk = tuple(pre_nms_topk), tuple(post_nms_topk)
        self.nms_thresh, self.min_box_size = nms_thresh, min_box_size
        self.smooth_l1_beta, self.loss_normalizer = smooth_l1_beta, loss_normalizer
        self.loss_weight = loss_weight

    @property
    def refine_topk(self) -> int:
        """Anchors per level whose head outputs a bf16 RPN recomputes in float32
        (``RefinedRPNHead``): the test-time pre-NMS top-k and a quarter more as margin."""
        k = self.pre_nms_topk[1]
        return k + k // 4

    def forward(
        self, features: Dict[str, Tensor], image_sizes: List[Tuple[int, int]],
        padded_size: Tuple[int, int], gt_boxes: Optional[List[Tensor]] = None,
    ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        """-> (per image proposals ``(R_i, 4)`` sorted by decreasing objectness, losses).

        ``gt_boxes`` (per image ``(G_i, 4)``) is needed in training only."""
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats, padded_size)  # per level [HWA, 4]
        logits, deltas = self.head(feats)
        n = feats[0].shape[0]
        # [N, A, H, W] -> [N, H*W*A]; [N, 4A, H, W] -> [N, H*W*A, 4]
        logits = [x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits]
        deltas = [x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2)
                  .reshape(n, -1, 4) for x in deltas]
        proposals = self._proposals(anchors, logits, deltas, image_sizes)
        losses: Dict[str, Tensor] = {}
        if self.training:
            if gt_boxes is None:
                raise ValueError("the RPN needs gt_boxes in training")
            losses = self._losses(torch.cat(anchors), torch.cat(logits, 1),
                                  torch.cat(deltas, 1), gt_boxes)
        return proposals, losses

    @torch.no_grad()
    def _proposals(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
                   image_sizes: List[Tuple[int, int]]) -> List[Tensor]:
        n = len(image_sizes)
        topk = self.pre_nms_topk[0 if self.training else 1]
        post_k = self.post_nms_topk[0 if self.training else 1]
        scores, boxes, levels = [], [], []
        for lvl, (a, lg, d) in enumerate(zip(anchors, logits, deltas)):
            s, idx = lg.detach().topk(min_size(topk, lg.shape[1]), dim=1)  # [N, k]
            d = torch.gather(d.detach(), 1, idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(d, a[idx]))  # [N, k, 4]
            scores.append(s)
            levels.append(torch.full_like(s[0], lvl, dtype=torch.int64))
        scores_t, boxes_t = torch.cat(scores, 1), torch.cat(boxes, 1)  # [N, K], [N, K, 4]
        boxes_t = clip_boxes(boxes_t, size_limits(image_sizes, boxes_t)[:, None, :])
        # [N, K] -> [N * K]: image index, and NMS group (image, level)
        image_idx = torch.arange(n, device=scores_t.device)[:, None].expand_as(scores_t)
        groups = image_idx * len(anchors) + torch.cat(levels)[None].expand_as(scores_t)
        image_idx, groups = image_idx.reshape(-1), groups.reshape(-1)
        boxes_t, scores_t = boxes_t.reshape(-1, 4), scores_t.reshape(-1)
        w, h = box_sizes(boxes_t)
        valid = (w > self.min_box_size) & (h > self.min_box_size) & torch.isfinite(scores_t)
        valid_idx = torch.nonzero(valid).squeeze(1)
        keep = valid_idx[batched_nms(boxes_t[valid_idx], scores_t[valid_idx],
                                     groups[valid_idx], self.nms_thresh)]
        keep = keep[top_k_per_group(image_idx[keep], n, post_k)]
        return split_per_image(boxes_t[keep], image_idx[keep], n)

    def _losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor,
                gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """anchors ``(P, 4)``, logits ``(N, P)``, deltas ``(N, P, 4)``."""
        pos_idx, neg_idx, targets = [], [], []
        num_anchors = anchors.shape[0]
        for i, gt in enumerate(gt_boxes):
            gt = gt.to(anchors.dtype)
            matched, labels = self.matcher(box_iou(gt, anchors))
            pos, neg = sample_balanced(labels, self.batch_size_per_image,
                                       self.positive_fraction)
            pos_idx.append(pos + i * num_anchors)
            neg_idx.append(neg + i * num_anchors)
            if gt.shape[0] > 0:
                targets.append(self.box_coder.encode(gt[matched[pos]], anchors[pos]))
            else:
                targets.append(anchors.new_zeros((0, 4)))
        pos_all, neg_all = torch.cat(pos_idx), torch.cat(neg_idx)
        sampled = torch.cat([pos_all, neg_all])
        flat_logits = logits.reshape(-1)
        target_labels = torch.cat([torch.ones_like(pos_all), torch.zeros_like(neg_all)])
        cls = F.binary_cross_entropy_with_logits(
            flat_logits[sampled], target_labels.to(flat_logits.dtype), reduction="sum")
        loc = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos_all], torch.cat(targets),
                               beta=self.smooth_l1_beta, reduction="sum")
        if self.loss_normalizer == "sampled":
            norm = max(sampled.numel(), 1)
        else:
            norm = len(gt_boxes) * self.batch_size_per_image
        return {"loss_rpn_cls": cls * (self.loss_weight / norm),
                "loss_rpn_loc": loc * (self.loss_weight / norm)}

