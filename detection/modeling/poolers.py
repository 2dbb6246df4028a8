"""RoIAlign over one or several feature levels, with each box sent to one level."""

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from .tracing import is_tracing


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes ``(R_i, 4)`` -> ``(sum R_i, 5)`` rows of (image index, x1, y1, x2, y2)."""
    idx = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
    return torch.cat([idx, torch.cat(list(boxes))], dim=1)


class ROIPooler(nn.Module):
    """Pool ``output_size`` x ``output_size`` features for each box.

    With several levels a box of side ``s = sqrt(area)`` goes to level
    ``floor(canonical_level + log2(s / canonical_box_size) + eps)`` (torchvision's LevelMapper,
    ``eps_inside_log=False``, eps 1e-6) or ``floor(canonical_level + log2(s /
    canonical_box_size + eps))`` (detectron2, eps 1e-8), clamped to the available levels.

    Args:
        output_size: pooled side.
        strides: stride of each level, finest first (levels must be consecutive powers of 2).
        sampling_ratio: RoIAlign samples per bin side (0: adaptive).
        aligned: RoIAlign's half-pixel shift (detectron2's ROIAlignV2; torchvision: False).
    """

    def __init__(
        self, *, output_size: int, strides: Sequence[int], sampling_ratio: int = 0,
        aligned: bool = True, canonical_box_size: float = 224.0, canonical_level: int = 4,
        eps: float = 1e-8, eps_inside_log: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = (int(output_size), int(output_size))
        self.scales = [1.0 / s for s in strides]
        self.sampling_ratio, self.aligned = int(sampling_ratio), aligned
        self.min_level = int(round(math.log2(strides[0])))
        self.max_level = int(round(math.log2(strides[-1])))
        if self.max_level - self.min_level + 1 != len(strides):
            raise ValueError(f"pooler strides must be consecutive powers of 2, got {strides}")
        self.canonical_box_size, self.canonical_level = canonical_box_size, canonical_level
        self.eps, self.eps_inside_log = eps, eps_inside_log

    def levels(self, rois: Tensor) -> Tensor:
        """Level index (0 for the finest) ``(R,)`` of rois ``(R, 5)``."""
        side = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        if self.eps_inside_log:
            lvl = torch.floor(self.canonical_level
                              + torch.log2(side / self.canonical_box_size + self.eps))
        else:
            lvl = torch.floor(self.canonical_level + torch.log2(side / self.canonical_box_size)
                              + self.eps)
        return (lvl.clamp(self.min_level, self.max_level) - self.min_level).to(torch.int64)

    def forward(self, features: List[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """features ``(N, C, H_l, W_l)`` per level, boxes per image ``(R_i, 4)`` ->
        ``(sum R_i, C, S, S)`` in the order of the boxes."""
        # torchvision's RoIAlign runs in float32 and float64 only (features of a bf16
        # backbone are pooled in float32) and reads NCHW: one pass makes both, once per level
        # however many calls read it.
        features = [f.to(f.dtype if f.dtype in (torch.float32, torch.float64)
                         else torch.float32, memory_format=torch.contiguous_format)
                    for f in features]
        rois = boxes_to_rois(boxes).to(features[0].dtype)
        parallel = self._parallel(rois)
        if len(features) == 1 and not parallel:
            return roi_align(features[0], rois, self.output_size, self.scales[0],
                             self.sampling_ratio, self.aligned)
        levels = (torch.zeros_like(rois[:, 0], dtype=torch.int64) if len(features) == 1
                  else self.levels(rois))
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        if parallel:
            return self._pool_in_threads(features, rois, levels, out)
        for lvl, (feat, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            if is_tracing():  # no branch on the data, and a scatter whatever idx's size
                pooled = roi_align(feat, rois[idx], self.output_size, scale,
                                   self.sampling_ratio, self.aligned).to(out.dtype)
                out = out.scatter(0, idx.view(-1, 1, 1, 1).expand(-1, *out.shape[1:]), pooled)
            elif idx.numel():
                out[idx] = roi_align(feat, rois[idx], self.output_size, scale,
                                     self.sampling_ratio, self.aligned).to(out.dtype)
        return out

    def _parallel(self, rois: Tensor) -> bool:
        """torchvision's CPU RoIAlign runs on one thread: at inference on a CPU, split the
        boxes over the intra-op threads (the kernel releases the GIL)."""
        return (rois.device.type == "cpu" and not torch.is_grad_enabled()
                and not is_tracing() and torch.get_num_threads() > 1
                and rois.shape[0] >= 2 * MIN_ROIS_PER_THREAD)

    def _pool_in_threads(self, features: List[Tensor], rois: Tensor, levels: Tensor,
                         out: Tensor) -> Tensor:
        threads = torch.get_num_threads()
        jobs = []  # (level, indices of its boxes), about threads jobs per level with boxes
        for lvl in range(len(features)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            parts = max(1, min(threads, idx.numel() // MIN_ROIS_PER_THREAD))
            jobs += [(lvl, chunk) for chunk in idx.chunk(parts) if chunk.numel()]
        inference = torch.is_inference_mode_enabled()

        def run(job):
            lvl, idx = job
            with torch.inference_mode(inference), torch.no_grad():
                return roi_align(features[lvl], rois[idx], self.output_size, self.scales[lvl],
                                 self.sampling_ratio, self.aligned)

        for (_, idx), pooled in zip(jobs, _executor(threads).map(run, jobs)):
            out[idx] = pooled
        return out


MIN_ROIS_PER_THREAD = 32
_EXECUTORS: Dict[int, ThreadPoolExecutor] = {}


def _executor(threads: int) -> ThreadPoolExecutor:
    if threads not in _EXECUTORS:
        _EXECUTORS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="roi_align")
    return _EXECUTORS[threads]
