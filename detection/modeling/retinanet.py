"""RetinaNet (Lin et al., ICCV 2017): a one-stage detector with focal loss on FPN levels P3-P7.

Two subnets of ``num_convs`` 3x3 convs (classification and box regression), shared by all
levels, predict ``A * K`` class logits and ``A * 4`` box deltas at every location, for ``A``
anchors per location (3 sizes x 3 aspect ratios). Training matches anchors to ground truth
by IoU (background below 0.4, foreground from 0.5, and each ground truth's best anchors) and
sums a sigmoid focal loss over every non-ignored anchor and a box loss over the foreground
ones. Inference keeps, per level, the top 1000 (anchor, class) scores above 0.05, decodes
their boxes and runs a per-class NMS.

The model owns its preprocessing (as ``GeneralizedRCNN``): ``model(images)`` takes RGB
``(3, H, W)`` images on a 0-255 scale and returns per image ``boxes`` ``(N, 4)`` xyxy in input
pixels, ``scores`` and ``labels`` in 0..K-1.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from backbones.fpn import ConvNorm
from backbones.fused import apply_relu

from .anchors import AnchorGenerator
from .box_ops import (
    BoxCoder,
    select_detections,
)
from .matcher import BACKGROUND, FOREGROUND, ATSSMatcher, Matcher
from .metadata import Metadata
from .preprocess import Preprocessor, detector_inputs, in_input_pixels
from .structures import Detections
from .tracing import is_tracing, min_size

BOX_LOSSES = ("smooth_l1", "giou")
LOSS_NORMALIZERS = ("ema", "per_image")


class RetinaNetHead(nn.Module):
    """The classification and box subnets, shared by all levels.

    Parameters: ``cls_convs.{i}.conv/.norm`` and ``box_convs.{i}.conv/.norm`` (3x3,
    ``in_channels`` wide, ReLU after each; the conv has a bias only without a norm),
    ``cls_score`` (3x3, ``A * K`` logits, anchor-major: channel ``a * K + k``) and
    ``bbox_pred`` (3x3, ``A * 4`` deltas).

    Init as both peers: normal(std 0.01) weights, zero biases, and the class logits' bias at
    ``-log((1 - prior_prob) / prior_prob)`` so that every anchor starts at foreground
    probability ``prior_prob``.
    """

    relu_layers = ("cls_convs", "box_convs")  # inference fusion (detection.optimize)
    plain_layers = ("cls_score", "bbox_pred")  # fused too, so that Winograd takes them

    def __init__(self, *, in_channels: int, num_anchors: int, num_classes: int,
                 num_convs: int = 4, norm: str = "none", prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.cls_convs = nn.ModuleList(ConvNorm(in_channels, in_channels, 3, norm)
                                       for _ in range(num_convs))
        self.box_convs = nn.ModuleList(ConvNorm(in_channels, in_channels, 3, norm)
                                       for _ in range(num_convs))
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _subnet(convs: nn.ModuleList, x: Tensor) -> Tensor:
        for block in convs:
            x = apply_relu(block, x)
        return x

    def forward(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """features ``(N, C, H_l, W_l)`` -> per level logits ``(N, H_l*W_l*A, K)`` and deltas
        ``(N, H_l*W_l*A, 4)``, ordered by location, then anchor (the anchors' order)."""
        logits, deltas = [], []
        for x in features:
            n, _, h, w = x.shape
            c = self.cls_score(self._subnet(self.cls_convs, x))  # [N, A*K, H, W]
            b = self.bbox_pred(self._subnet(self.box_convs, x))  # [N, A*4, H, W]
            logits.append(c.view(n, self.num_anchors, self.num_classes, h, w)
                          .permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes))
            deltas.append(b.view(n, self.num_anchors, 4, h, w)
                          .permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return logits, deltas


class RunningMean:
    """An exponential running mean (``momentum`` on the old value) with ``state_dict`` and
    ``load_state_dict``, so that a training checkpoint can carry it."""

    def __init__(self, initial: float, momentum: float) -> None:
        self.value, self.momentum = float(initial), float(momentum)

    def update(self, sample: float) -> float:
        self.value = self.momentum * self.value + (1 - self.momentum) * float(sample)
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


def _at_least_float32(*tensors: Tensor) -> Tuple[Tensor, ...]:
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


class RetinaNet(nn.Module):
    """RetinaNet that owns its preprocessing; see the module docstring for the call.

    Args:
        preprocessor, backbone, head, anchor_generator: built parts (the backbone returns at
            least ``in_features``).
        in_features: the feature maps the head runs on (p3..p7).
        box_coder: anchor-delta coding (weights (1, 1, 1, 1) in both peers).
        matcher: anchor matching (IoU 0.4 / 0.5 with low-quality matches).
        focal_alpha, focal_gamma: of the sigmoid focal loss.
        box_loss: "smooth_l1" (``smooth_l1_beta`` 0 is L1) or "giou" (on decoded boxes).
        box_loss_weight: multiplies the box loss (1 in both peers' RetinaNet configs;
            mmdetection's ATSS and GFL configs weigh their GIoU loss by 2).
        loss_normalizer: "ema" (detectron2: batch sums over a running mean, from 100 with
            momentum 0.9, of the batch's foreground anchors) or "per_image" (torchvision:
            each image's sums over its own foreground count, averaged over images).
        score_thresh, topk_candidates: per level, the top ``topk_candidates`` (anchor, class)
            scores above ``score_thresh`` are decoded.
        nms_thresh, detections_per_image: per-class NMS, then the best per image.
        metadata: class names and dataset ids of labels 0..K-1.

    ``detection.optimize.optimize_for_inference`` runs the backbone in bf16 and the head,
    anchors, decoding and NMS in float32 (``bf16_split``).
    """

    bf16_split = {"backbone": "input", "head": "fp32"}

    def __init__(
        self, *, preprocessor: Preprocessor, backbone: nn.Module, head: RetinaNetHead,
        anchor_generator: AnchorGenerator, in_features: Sequence[str], box_coder: BoxCoder,
        matcher: Union[Matcher, ATSSMatcher], focal_alpha: float = 0.25, focal_gamma: float = 2.0,
        box_loss: str = "smooth_l1", smooth_l1_beta: float = 0.0, box_loss_weight: float = 1.0,
        loss_normalizer: str = "ema", score_thresh: float = 0.05,
        topk_candidates: int = 1000, nms_thresh: float = 0.5, detections_per_image: int = 100,
        metadata: Optional[Metadata] = None,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        if loss_normalizer not in LOSS_NORMALIZERS:
            raise ValueError(f"loss_normalizer must be one of {LOSS_NORMALIZERS}, "
                             f"got {loss_normalizer!r}")
        if len(set(anchor_generator.num_anchors)) != 1 or \
                anchor_generator.num_anchors[0] != head.num_anchors:
            raise ValueError(f"the head predicts {head.num_anchors} anchors per location, the "
                             f"anchor generator makes {anchor_generator.num_anchors} per level")
        self.preprocessor, self.backbone, self.head = preprocessor, backbone, head
        self.anchor_generator = anchor_generator
        self.in_features = list(in_features)
        self.box_coder, self.matcher = box_coder, matcher
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.box_loss, self.smooth_l1_beta = box_loss, float(smooth_l1_beta)
        self.box_loss_weight = float(box_loss_weight)
        self.loss_normalizer = loss_normalizer
        self.score_thresh, self.topk_candidates = float(score_thresh), int(topk_candidates)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_image = int(detections_per_image)
        k = head.num_classes
        self.metadata = metadata or Metadata(class_names=[f"class_{i}" for i in range(k)])
        if self.metadata.num_classes != k:
            raise ValueError(f"metadata names {self.metadata.num_classes} classes but the head "
                             f"predicts {k}")
        # detectron2's running foreground count: not a buffer (peers' checkpoints lack it),
        # a training state that training checkpoints carry (``training_states``)
        self.foreground = RunningMean(100.0, momentum=0.9)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        batch, sizes, targets = detector_inputs(self, images, targets)
        features = self.backbone(batch)
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats, tuple(batch.shape[-2:]))  # per level [HWA, 4]
        logits, deltas = self.head(feats)
        if self.training:
            assert targets is not None
            return self.losses(anchors, logits, deltas, targets)
        return in_input_pixels(self.inference(anchors, logits, deltas, sizes), sizes, images)

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, targets: List[Dict[str, Tensor]],
                      num_per_level: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
        """-> (labels ``(N, P)``: class 0..K-1, K for background, -1 ignored; matched
        ground-truth boxes ``(N, P, 4)``, meaningful where the label is a class).
        ``num_per_level`` (anchors per level) is needed by the ATSS matcher."""
        labels, boxes = [], []
        k = self.num_classes
        for t in targets:
            gt = t["boxes"].to(anchors.dtype)
            if isinstance(self.matcher, ATSSMatcher):
                if num_per_level is None:
                    raise ValueError("the ATSS matcher needs the anchors per level")
                matched, quality = self.matcher(gt, anchors, num_per_level,
                                                box_iou(gt, anchors))
            else:
                matched, quality = self.matcher(box_iou(gt, anchors))
            if gt.shape[0] == 0:
                labels.append(torch.full_like(matched, k))
                boxes.append(torch.zeros_like(anchors))
                continue
            lab = t["labels"].to(matched.device)[matched]
            lab = torch.where(quality == BACKGROUND, torch.full_like(lab, k), lab)
            lab = torch.where((quality != BACKGROUND) & (quality != FOREGROUND),
                              torch.full_like(lab, -1), lab)
            labels.append(lab)
            boxes.append(gt[matched])
        return torch.stack(labels), torch.stack(boxes)

    def losses(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        anchors_t = torch.cat(anchors)  # [P, 4]
        # [N, P, K], [N, P, 4]; at least float32 whatever the head ran in (bf16 autocast)
        logits_t, deltas_t = _at_least_float32(torch.cat(logits, 1), torch.cat(deltas, 1))
        gt_labels, gt_boxes = self.label_anchors(anchors_t, targets,
                                                 [a.shape[0] for a in anchors])
        n, k = len(targets), self.num_classes
        valid = gt_labels >= 0
        pos = valid & (gt_labels != k)
        # [N, P, K+1] one-hot without the background column; ignored anchors drop out below
        onehot = F.one_hot(gt_labels.clamp(min=0), k + 1)[..., :k].to(logits_t.dtype)
        focal = sigmoid_focal_loss(logits_t, onehot, alpha=self.focal_alpha,
                                   gamma=self.focal_gamma, reduction="none")
        cls_per_image = (focal.sum(-1) * valid).sum(1)  # [N]

        pos_idx = torch.nonzero(pos)  # [F, 2]: (image, anchor)
        img_idx, anc_idx = pos_idx[:, 0], pos_idx[:, 1]
        pred = deltas_t[img_idx, anc_idx]
        if self.box_loss == "giou":
            box = generalized_box_iou_loss(self.box_coder.decode(pred, anchors_t[anc_idx]),
                                           gt_boxes[img_idx, anc_idx], reduction="none")
        else:
            target = self.box_coder.encode(gt_boxes[img_idx, anc_idx], anchors_t[anc_idx])
            box = F.smooth_l1_loss(pred, target, beta=self.smooth_l1_beta,
                                   reduction="none").sum(-1)
        box_per_image = box.new_zeros(n).index_add(0, img_idx, box) * self.box_loss_weight

        num_pos = pos.sum(1)  # [N]
        if self.loss_normalizer == "per_image":
            norm = num_pos.clamp(min=1).to(cls_per_image.dtype)
            return {"loss_cls": (cls_per_image / norm).mean(),
                    "loss_box_reg": (box_per_image / norm).mean()}
        norm = self.foreground.update(max(int(num_pos.sum()), 1))
        return {"loss_cls": cls_per_image.sum() / norm, "loss_box_reg": box_per_image.sum() / norm}

    def training_states(self) -> Dict[str, "RunningMean"]:
        """States besides the parameters that resuming a training run restores (the trainer
        registers them with its checkpointer)."""
        return {"retinanet_foreground": self.foreground}

    # ------------------------------------------------------------------ inference

    def _top_candidates(self, flat: Tensor) -> Tuple[Tensor, Tensor]:
        """The top ``topk_candidates`` logits of each row of ``flat`` ``[N, L]``, and their
        indices. In eager mode only logits within reach of ``score_thresh`` compete (the
        others are dropped after the top-k anyway): the result is the same set, without a
        top-k over every (anchor, class) pair (11M on P3 at 800x1067, 0.12 s here). Rows
        with fewer candidates are padded with -inf logits, which the threshold drops."""
        k = min_size(self.topk_candidates, flat.shape[1])
        if is_tracing() or self.score_thresh <= 0 or flat.shape[1] <= 4 * self.topk_candidates:
            return flat.topk(k, dim=1)
        # a margin below the threshold's logit, so that float rounding loses no candidate
        low = math.log(self.score_thresh) - math.log1p(-self.score_thresh) - 1e-3
        cand = [torch.nonzero(row > low).squeeze(1) for row in flat]
        k = max(1, min(k, max(c.numel() for c in cand)))
        tops, idxs = [], []
        for row, c in zip(flat, cand):
            top, j = row[c].topk(min(k, c.numel()))
            tops.append(F.pad(top, (0, k - top.numel()), value=float("-inf")))
            idxs.append(F.pad(c[j], (0, k - top.numel())))
        return torch.stack(tops), torch.stack(idxs)

    @torch.no_grad()
    def inference(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
                  image_sizes: List[Tuple[int, int]]) -> List[Detections]:
        """Per image: per level the top ``topk_candidates`` (anchor, class) pairs by score
        (``_top_candidates``), those above ``score_thresh`` decoded and clipped, a per-class
        NMS, the best ``detections_per_image``; boxes in the resized image's pixels."""
        n, k = len(image_sizes), self.num_classes
        scores, boxes, labels = [], [], []
        for a, lg, d in zip(anchors, logits, deltas):
            flat = lg.reshape(n, -1)  # [N, HWA*K], index = anchor * K + class
            top, idx = self._top_candidates(flat)
            anchor_idx = idx // k
            d = torch.gather(d, 1, anchor_idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(d, a[anchor_idx]))  # [N, k, 4]
            scores.append(torch.sigmoid(top))
            labels.append(idx % k)
        per_image = select_detections(
            torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1), image_sizes,
            num_classes=k, score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
            detections_per_image=self.detections_per_image)
        return [Detections(boxes=b, scores=s, labels=lab) for b, s, lab in per_image]
