"""The Keypoint R-CNN keypoint head (He et al., 2017), as torchvision's ``KeypointRCNNHeads`` +
``KeypointRCNNPredictor`` and detectron2's ``KRCNNConvDeconvUpsampleHead`` build it: RoIAlign
14 x 14 on the FPN levels, eight 3x3 convs of 512 with ReLU, a 4x4 stride-2 deconvolution to
one heatmap per keypoint and a 2x bilinear upsampling: ``(R, K, 56, 56)`` heatmap logits.

It attaches to ``StandardROIHeads`` as ``keypoint_head``: ``loss`` on the foreground sampled
RoIs in training, ``predict`` on the final detections at inference (see ``KeypointHead`` in
``roi_heads``).
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.fused import apply_relu

from .poolers import ROIPooler
from .roi_heads import conv_stack
from .structures import Detections, SampledProposals
from .tracing import is_tracing

__all__ = ["KeypointRCNNHead", "decode_heatmaps", "decode_heatmaps_padded",
           "keypoint_targets", "shift_keypoints"]


def shift_keypoints(result: Dict[str, Tensor], offset: float) -> Dict[str, Tensor]:
    """``result`` (a target or an output dict) with ``offset`` added to the x and y of its
    ``keypoints`` ``(N, K, 3)``; the same dict when it has none or ``offset`` is 0."""
    if not offset or result.get("keypoints") is None:
        return result
    kp = result["keypoints"]
    shift = kp.new_tensor([offset, offset, 0.0])
    return {**result, "keypoints": kp + shift}


def keypoint_targets(keypoints: Tensor, rois: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """The heatmap cell of each keypoint in its RoI, as Detectron's ``keypoints_to_heatmap``.

    ``keypoints`` ``(R, K, 3)`` (x, y, visibility) in image pixels, ``rois`` ``(R, 4)`` xyxy
    -> (flat cell index ``y * size + x`` ``(R, K)`` int64, 0 where invalid; ``valid`` ``(R, K)``
    bool: visible (v > 0) and inside the RoI). A keypoint on the RoI's right or bottom edge
    falls in the last cell.
    """
    x0, y0, x1, y1 = (rois[:, i:i + 1] for i in range(4))  # [R, 1] each
    x, y = keypoints[..., 0], keypoints[..., 1]
    gx = ((x - x0) * (size / (x1 - x0))).floor().long()
    gy = ((y - y0) * (size / (y1 - y0))).floor().long()
    gx = torch.where(x == x1, torch.full_like(gx, size - 1), gx)
    gy = torch.where(y == y1, torch.full_like(gy, size - 1), gy)
    inside = (gx >= 0) & (gy >= 0) & (gx < size) & (gy < size)
    valid = inside & (keypoints[..., 2] > 0)
    return (gy * size + gx) * valid, valid


def decode_heatmaps(heatmaps: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """Heatmap logits ``(N, K, M, M)`` of ``boxes`` ``(N, 4)`` -> (``keypoints`` ``(N, K, 3)``
    (x, y, 1) in the boxes' coordinates; ``scores`` ``(N, K)``, the logit at each maximum).

    Each box's maps are upsampled (bicubic) to its size in pixels, rounded up, and the
    maximum cell's centre is mapped back into the box (Heckbert's ``c = d + 0.5``), as
    torchvision and detectron2 decode them. One box at a time: the sizes differ. Under
    tracing, :func:`decode_heatmaps_padded` (one graph for any number of boxes).
    """
    if is_tracing():
        return decode_heatmaps_padded(heatmaps, boxes)
    n, k = heatmaps.shape[:2]
    keypoints = heatmaps.new_zeros((n, k, 3))
    scores = heatmaps.new_zeros((n, k))
    if n == 0:
        return keypoints, scores
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    out_w, out_h = widths.ceil(), heights.ceil()
    keypoints[:, :, 2] = 1
    idx = torch.arange(k, device=heatmaps.device)
    for i, (w, h) in enumerate(zip(out_w.tolist(), out_h.tolist())):
        roi_map = F.interpolate(heatmaps[i][:, None], size=(int(h), int(w)), mode="bicubic",
                                align_corners=False)[:, 0]  # [K, h, w]
        pos = roi_map.reshape(k, -1).argmax(dim=1)
        x_int = pos % int(w)
        y_int = torch.div(pos - x_int, int(w), rounding_mode="floor")
        keypoints[i, :, 0] = (x_int.to(heatmaps.dtype) + 0.5) * (widths[i] / w) + boxes[i, 0]
        keypoints[i, :, 1] = (y_int.to(heatmaps.dtype) + 0.5) * (heights[i] / h) + boxes[i, 1]
        scores[i] = roi_map[idx, y_int, x_int]
    return keypoints, scores


def _bicubic_weights(out_sizes: Tensor, length: Tensor, size: int) -> Tensor:
    """Per box, the matrix ``(length, size)`` that upsamples ``size`` samples to
    ``out_sizes[i]`` as ``F.interpolate(mode="bicubic", align_corners=False)`` does (Keys'
    kernel, a = -0.75, indices clamped at the borders); rows from ``out_sizes[i]`` on are
    padding -> ``(N, length, size)``."""
    a = -0.75
    dst = torch.arange(length, device=out_sizes.device).to(out_sizes.dtype)
    src = (size / out_sizes)[:, None] * (dst[None] + 0.5) - 0.5  # [N, L]
    first = src.floor()
    t = src - first
    u = 1.0 - t
    coeffs = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
              ((a + 2) * t - (a + 3)) * t * t + 1,
              ((a + 2) * u - (a + 3)) * u * u + 1,
              ((a * (u + 1) - 5 * a) * (u + 1) + 8 * a) * (u + 1) - 4 * a)
    cells = torch.arange(size, device=out_sizes.device)
    taps = [(first.long() + (j - 1)).clamp(0, size - 1) for j in range(4)]
    return sum((i[..., None] == cells).to(src.dtype) * c[..., None] for i, c in zip(taps, coeffs))


def decode_heatmaps_padded(heatmaps: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`decode_heatmaps` for all boxes at once, for export: each box's maps are
    upsampled by bicubic interpolation matrices into a canvas as large as the largest box
    (its own size and no larger: the cells beyond are masked out), so that the number of
    boxes and their sizes stay symbolic in a traced graph. Equal to ``decode_heatmaps`` up
    to float rounding; the canvas takes ``N * K * max_h * max_w`` floats."""
    m = heatmaps.shape[-1]
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    out_w, out_h = widths.ceil(), heights.ceil()
    one = out_w.new_ones(1)  # no boxes: a 1 x 1 canvas
    max_w = torch.cat((out_w, one)).max().long()
    max_h = torch.cat((out_h, one)).max().long()
    rows = _bicubic_weights(out_h, max_h, m)  # [N, max_h, M]
    cols = _bicubic_weights(out_w, max_w, m)  # [N, max_w, M]
    maps = rows[:, None] @ heatmaps @ cols[:, None].transpose(2, 3)  # [N, K, max_h, max_w]
    ys = torch.arange(max_h, device=boxes.device).to(boxes.dtype)
    xs = torch.arange(max_w, device=boxes.device).to(boxes.dtype)
    inside = (ys[None, :, None] < out_h[:, None, None]) & (xs[None, None] < out_w[:, None, None])
    maps = maps.masked_fill(~inside[:, None], float("-inf"))
    # explicit sizes: a -1 cannot be inferred when there are no boxes
    flat = maps.reshape(heatmaps.shape[0], heatmaps.shape[1], max_h * max_w)
    scores, pos = flat.max(dim=2)  # [N, K]
    x_int = pos % max_w
    y_int = torch.div(pos - x_int, max_w, rounding_mode="floor")
    x = (x_int.to(heatmaps.dtype) + 0.5) * (widths / out_w)[:, None] + boxes[:, 0:1]
    y = (y_int.to(heatmaps.dtype) + 0.5) * (heights / out_h)[:, None] + boxes[:, 1:2]
    return torch.stack((x, y, torch.ones_like(x)), dim=2), scores


class KeypointRCNNHead(nn.Module):
    """Pooler + conv tower + deconvolution + 2x upsampling.

    ``forward``: pooled features ``(R, C, S, S)`` -> heatmap logits ``(R, K, 4S, 4S)``.

    Args:
        in_features: feature maps to pool from, finest first (``p2``..``p5``).
        pooler: the RoI pooler (same level rule as the box pooler; 14 x 14).
        in_channels: C, channels of the pooled features.
        num_classes: the box predictor's K (foreground RoIs have labels below it).
        num_keypoints: K (17 for COCO persons).
        conv_dims: widths of the 3x3 convs (eight of 512).
        loss_weight: factor on the loss.
        normalize_by_visible: divide the summed cross-entropy by the number of visible
            keypoints (torchvision; detectron2's default); otherwise by ``loss_normalizer``.
        loss_normalizer: detectron2's fixed normaliser per image (``BATCH_SIZE_PER_IMAGE *
            POSITIVE_FRACTION * K``), used when ``normalize_by_visible`` is False.
        coordinate_offset: the weights' keypoint convention: 0 for raw COCO coordinates
            (torchvision), 0.5 for detectron2's (index + 0.5). ``GeneralizedRCNN`` adds it to
            the target keypoints and subtracts it from its outputs, both in the pixels of its
            input images (:func:`shift_keypoints`); the head itself works in the weights'
            convention.
    """

    relu_layers = ("convs",)  # inference fusion (detection.optimize)

    def __init__(self, *, in_features: Sequence[str], pooler: ROIPooler, in_channels: int,
                 num_classes: int, num_keypoints: int = 17, conv_dims: Sequence[int] = (512,) * 8,
                 loss_weight: float = 1.0, normalize_by_visible: bool = True,
                 loss_normalizer: float = 0.0, coordinate_offset: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.pooler = list(in_features), pooler
        self.coordinate_offset = float(coordinate_offset)
        self.num_classes, self.num_keypoints = num_classes, num_keypoints
        self.loss_weight, self.normalize_by_visible = loss_weight, normalize_by_visible
        self.loss_normalizer = loss_normalizer
        self.convs = conv_stack(in_channels, conv_dims, "none")
        for c in self.convs:
            nn.init.zeros_(c.conv.bias)
        in_channels = conv_dims[-1] if conv_dims else in_channels
        self.score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, 4, stride=2,
                                               padding=1)
        nn.init.kaiming_normal_(self.score_lowres.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.score_lowres.bias)

    @property
    def resolution(self) -> int:
        """M, the side of the heatmaps."""
        return 4 * self.pooler.output_size[0]

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = apply_relu(conv, x)
        x = self.score_lowres(x)  # [R, K, 2S, 2S]
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)

    def _logits(self, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        return self(self.pooler([features[f] for f in self.in_features], boxes))

    def loss(self, features: Dict[str, Tensor], sampled: SampledProposals,
             targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """``loss_keypoint``: cross-entropy over each foreground RoI's ``M * M`` heatmap cells,
        one term per visible keypoint inside the RoI, of its matched instance."""
        if any("keypoints" not in t for t in targets):
            raise KeyError("Keypoint R-CNN training needs 'keypoints' (G, K, 3) in every "
                           "target; set MODEL.KEYPOINT_ON so that the data mapper provides them")
        for j, t in enumerate(targets):
            kp, g = t["keypoints"], t["boxes"].shape[0]
            if kp.dim() != 3 or kp.shape[0] != g or kp.shape[1:] != (self.num_keypoints, 3):
                raise ValueError(f"target {j}: keypoints of shape {tuple(kp.shape)}, expected "
                                 f"({g}, {self.num_keypoints}, 3) for its {g} boxes")
        fg = [torch.nonzero(lab < self.num_classes).squeeze(1) for lab in sampled.labels]
        boxes = [b[i] for b, i in zip(sampled.boxes, fg)]
        zero = sum(p.sum() for p in self.parameters()) * 0.0
        if sum(b.shape[0] for b in boxes) == 0:
            return {"loss_keypoint": zero}
        m = self.resolution
        cells, valid = [], []
        for t, b, mg, i in zip(targets, boxes, sampled.matched_gt, fg):
            kp = t["keypoints"].to(b.dtype)[mg[i]] if t["keypoints"].shape[0] else \
                b.new_zeros((b.shape[0], self.num_keypoints, 3))
            c, v = keypoint_targets(kp, b, m)
            cells.append(c.reshape(-1))
            valid.append(v.reshape(-1))
        cell, ok = torch.cat(cells), torch.nonzero(torch.cat(valid)).squeeze(1)
        normalizer = (ok.numel() if self.normalize_by_visible
                      else self.loss_normalizer * len(targets))
        if ok.numel() == 0 or normalizer == 0:
            return {"loss_keypoint": zero}
        logits = self._logits(features, boxes).flatten(2).flatten(0, 1)  # [R * K, M * M]
        loss = F.cross_entropy(logits[ok], cell[ok], reduction="sum") / normalizer
        return {"loss_keypoint": loss * self.loss_weight}

    @torch.no_grad()
    def predict(self, features: Dict[str, Tensor],
                detections: List[Detections]) -> List[Detections]:
        """Set each detection's ``keypoints`` ``(N, K, 3)`` (x, y, 1) and ``keypoints_scores``
        ``(N, K)``, in the coordinates of the resized image."""
        boxes = [d.boxes for d in detections]
        if not is_tracing() and sum(b.shape[0] for b in boxes) == 0:
            for d in detections:
                d.keypoints = d.boxes.new_zeros((0, self.num_keypoints, 3))
                d.keypoints_scores = d.boxes.new_zeros((0, self.num_keypoints))
            return detections
        heatmaps = self._logits(features, boxes)
        keypoints, scores = decode_heatmaps(heatmaps, torch.cat(boxes))
        counts = [b.shape[0] for b in boxes]
        for d, kp, s in zip(detections, keypoints.split(counts), scores.split(counts)):
            d.keypoints, d.keypoints_scores = kp, s
        return detections
