"""The Mask R-CNN mask head (He et al., 2017): RoIAlign 14 x 14 on the FPN levels, four 3x3
convs, a 2x2 stride-2 deconvolution and a 1x1 conv to one 28 x 28 mask logit map per class.

It implements ``detection.modeling.roi_heads.MaskHead``: ``loss`` on the foreground sampled
RoIs in training, ``predict`` on the final detections at inference.
"""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.fused import apply_relu
from detection.modeling.poolers import ROIPooler
from detection.modeling.roi_heads import conv_stack
from detection.modeling.structures import Detections, SampledProposals
from detection.modeling.tracing import is_tracing

from .targets import mask_targets


class MaskRCNNHead(nn.Module):
    """Pooler + conv tower + upsampling + per-class predictor.

    ``forward``: pooled features ``(R, C, S, S)`` -> mask logits ``(R, K, 2S, 2S)`` (``K = 1``
    when class-agnostic).

    Args:
        in_features: feature maps to pool from, finest first (``p2``..``p5``).
        pooler: the RoI pooler (same level rule as the box pooler).
        in_channels: C, channels of the pooled features.
        num_classes: K foreground classes.
        conv_dims: widths of the 3x3 convs (four of 256 in the paper).
        norm: norm after each conv ("none", "BN", "GN", ...; torchvision v2 uses BN).
        cls_agnostic: one mask per RoI instead of one per class.
        target_aligned: RoIAlign's half-pixel shift when cropping the targets.
    """

    relu_layers = ("convs",)  # inference fusion (detection.optimize)

    def __init__(self, *, in_features: Sequence[str], pooler: ROIPooler, in_channels: int,
                 num_classes: int, conv_dims: Sequence[int] = (256, 256, 256, 256),
                 norm: str = "none", cls_agnostic: bool = False,
                 target_aligned: bool = False) -> None:
        super().__init__()
        self.in_features, self.pooler = list(in_features), pooler
        self.num_classes, self.cls_agnostic = num_classes, cls_agnostic
        self.target_aligned = target_aligned
        self.convs = conv_stack(in_channels, conv_dims, norm)
        in_channels = conv_dims[-1] if conv_dims else in_channels
        self.deconv = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        self.predictor = nn.Conv2d(in_channels, 1 if cls_agnostic else num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    @property
    def resolution(self) -> int:
        """M, the side of the predicted masks."""
        return 2 * self.pooler.output_size[0]

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = apply_relu(conv, x)
        return self.predictor(F.relu(self.deconv(x)))

    def _logits(self, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        return self(self.pooler([features[f] for f in self.in_features], boxes))

    def _select(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The channel of each RoI's class: ``(R, K, M, M)`` -> ``(R, M, M)``."""
        if self.cls_agnostic:
            return logits[:, 0]
        return logits[torch.arange(logits.shape[0], device=logits.device), labels]

    def loss(self, features: Dict[str, Tensor], sampled: SampledProposals,
             targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Mean binary cross-entropy of the true class's mask logits over the foreground
        RoIs' ``M x M`` cells, against the matched instance masks cropped to the RoIs."""
        fg = [torch.nonzero(lab < self.num_classes).squeeze(1) for lab in sampled.labels]
        boxes = [b[i] for b, i in zip(sampled.boxes, fg)]
        labels = torch.cat([lab[i] for lab, i in zip(sampled.labels, fg)])
        if any("masks" not in t for t in targets):
            raise KeyError("Mask R-CNN training needs 'masks' (G, H, W) in every target; set "
                           "MODEL.MASK_ON so that the data mapper provides them")
        for j, t in enumerate(targets):
            if t["masks"].shape[0] != t["boxes"].shape[0]:
                raise ValueError(f"target {j}: {t['masks'].shape[0]} masks for "
                                 f"{t['boxes'].shape[0]} boxes")
        if labels.numel() == 0:  # no foreground: a zero that keeps the graph connected
            return {"loss_mask": sum(p.sum() for p in self.parameters()) * 0.0}
        logits = self._logits(features, boxes)
        gt = mask_targets([t["masks"] for t in targets], boxes,
                          [m[i] for m, i in zip(sampled.matched_gt, fg)], self.resolution,
                          aligned=self.target_aligned)
        pred = self._select(logits, labels)
        return {"loss_mask": F.binary_cross_entropy_with_logits(pred, gt.to(pred.dtype))}

    @torch.no_grad()
    def predict(self, features: Dict[str, Tensor],
                detections: List[Detections]) -> List[Detections]:
        """Set each detection's ``masks``: the sigmoid of its class's logits, ``(N, 1, M, M)``
        (pasted into the image by the model, once the boxes are in input pixels)."""
        boxes = [d.boxes for d in detections]
        if not is_tracing() and sum(b.shape[0] for b in boxes) == 0:
            m = self.resolution
            for d in detections:
                d.masks = d.boxes.new_zeros((0, 1, m, m))
            return detections
        logits = self._logits(features, boxes)
        probs = self._select(logits, torch.cat([d.labels for d in detections])).sigmoid()
        if len(detections) == 1:
            detections[0].masks = probs[:, None]
            return detections
        for d, p in zip(detections, probs.split([b.shape[0] for b in boxes])):
            d.masks = p[:, None]
        return detections
