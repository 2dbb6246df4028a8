"""RoIAlign over one or several feature levels, with each box sent to one level."""

import math
from typing import List, Optional, Sequence, Tuple

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
        rois = boxes_to_rois(boxes)
        if _gather_path(features[0], rois):
            kernel = roi_align_gathered  # reads any float features, pools in float32/64
        elif _train_path(features[0]):
            kernel = roi_align_trainable  # torchvision's forward, a threaded backward
            features = [f if f.dtype in (torch.float32, torch.float64) else f.float()
                        for f in features]
        else:
            # torchvision's RoIAlign (autograd, tracing, CUDA) runs in float32 and float64
            # only (features of a bf16 backbone are pooled in float32).
            kernel = roi_align
            features = [f if f.dtype in (torch.float32, torch.float64) else f.float()
                        for f in features]
        rois = rois.to(torch.float64 if features[0].dtype == torch.float64 else torch.float32)
        if len(features) == 1:
            return kernel(features[0], rois, self.output_size, self.scales[0],
                          self.sampling_ratio, self.aligned)
        levels = self.levels(rois)
        shape = (rois.shape[0], features[0].shape[1], *self.output_size)
        if kernel is roi_align_gathered:  # its results' layout: level scatters copy rows
            out = torch.empty(shape, dtype=rois.dtype, device=rois.device,
                              memory_format=torch.channels_last)  # each roi has one level
        else:
            out = rois.new_zeros(shape)
        for lvl, (feat, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            if is_tracing():  # no branch on the data, and a scatter whatever idx's size
                pooled = roi_align(feat, rois[idx], self.output_size, scale,
                                   self.sampling_ratio, self.aligned).to(out.dtype)
                out = out.scatter(0, idx.view(-1, 1, 1, 1).expand(-1, *out.shape[1:]), pooled)
            elif kernel is roi_align_gathered and idx.numel():
                roi_align_gathered(feat, rois[idx], self.output_size, scale,
                                   self.sampling_ratio, self.aligned, out=out, out_rows=idx)
            elif idx.numel():
                out[idx] = kernel(feat, rois[idx], self.output_size, scale,
                                  self.sampling_ratio, self.aligned).to(out.dtype)
        return out


def _gather_path(feature: Tensor, rois: Tensor) -> bool:
    """At inference on a CPU, RoIAlign as gathers and small matrix products over
    channels-last features (``roi_align_gathered``) instead of torchvision's kernel, which
    runs on one thread and reads NCHW (a layout copy of every level per call)."""
    return (feature.device.type == "cpu" and not torch.is_grad_enabled()
            and not is_tracing() and rois.shape[0] > 0)


def _train_path(feature: Tensor) -> bool:
    """Training on a CPU: torchvision's RoIAlign forward with ``roi_align_gathered_backward``
    (torchvision's backward runs on one thread: 0.3 s of a 2.3 s shapes-default step)."""
    return (feature.device.type == "cpu" and torch.is_grad_enabled() and feature.requires_grad
            and not is_tracing())


def _axis_weights(start: Tensor, size: Tensor, bins: int, grid: Tensor, length: int):
    """RoIAlign along one axis as a matrix: for each roi (its ``start`` and ``size`` in
    feature pixels, ``grid`` samples per bin), the weight of each feature row (column) in each
    bin's average of bilinear samples. Returns the first row read ``lo`` ``(R,)``, the rows
    each roi reads ``span`` ``(R,)``, and weights ``(R, bins, max span)`` for rows ``lo + k``.

    Sample rules as torchvision's kernel: a sample beyond ``[-1, length]`` counts as zero
    (but in the average's count), one in ``[-1, 0]`` reads row 0, one past the last row reads
    the last row."""
    r = start.shape[0]
    steps = torch.arange(max(int(grid.max()), 1), dtype=start.dtype)
    grid_f = grid.to(start.dtype).clamp(min=1)
    bin_size = size / bins
    pos = (start[:, None, None]
           + torch.arange(bins, dtype=start.dtype)[None, :, None] * bin_size[:, None, None]
           + (steps + 0.5)[None, None, :] * (bin_size / grid_f)[:, None, None])
    valid = (pos >= -1.0) & (pos <= length) & (steps[None, None, :] < grid[:, None, None])
    pos = pos.clamp(min=0)
    low = pos.floor().to(torch.int64)
    last = low >= length - 1
    low = low.clamp(max=length - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(pos), pos - low.to(pos.dtype))
    share = valid.to(pos.dtype) / grid_f[:, None, None]
    lo = torch.where(valid, low, length).amin(dim=(1, 2)).clamp(max=length - 1)
    span = (torch.where(valid, high, -1).amax(dim=(1, 2)) - lo + 1).clamp(min=1)
    k = int(span.max())
    weights = pos.new_zeros((r, bins, k))
    weights.scatter_add_(2, (low - lo[:, None, None]).clamp(0, k - 1), share * (1 - frac))
    weights.scatter_add_(2, (high - lo[:, None, None]).clamp(0, k - 1), share * frac)
    return lo, span, weights


GATHER_CHUNK = 1 << 23  # window elements gathered at a time (32 MiB in float32)


def _roi_windows(rois: Tensor, hwc: Tuple[int, int, int], output_size, scale: float,
                 sampling_ratio: int, aligned: bool):
    """What RoIAlign reads, per roi: a window of feature rows and columns and the weights of
    each bin over them (``_axis_weights``). Returns ``pixel_of(idx, ky, kx)`` (the flat
    channels-last pixel index ``(r, ky, kx)`` of rois ``idx``' windows), ``weight_y``
    ``(R, ph, max ky)``, ``weight_x`` ``(R, pw, max kx)``, and the rois grouped by window size,
    each group ``(rois, ky, kx, rois per chunk of about GATHER_CHUNK elements)``."""
    h, w, c = hwc
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    width, height = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:  # torchvision's legacy mode makes every roi at least 1x1
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_y = grid_x = torch.full_like(rois[:, 0], sampling_ratio, dtype=torch.int64)
    else:  # adaptive: ceil(roi side / bins) samples per bin side
        grid_y, grid_x = torch.ceil(height / ph).long(), torch.ceil(width / pw).long()
    y0, span_y, weight_y = _axis_weights(y1, height, ph, grid_y, h)
    x0, span_x, weight_x = _axis_weights(x1, width, pw, grid_x, w)
    image = rois[:, 0].long()
    # positions past a roi's span have zero weight; clamped, they stay inside the map
    rows = (y0[:, None] + torch.arange(weight_y.shape[2])).clamp(max=h - 1)
    cols = (x0[:, None] + torch.arange(weight_x.shape[2])).clamp(max=w - 1)

    def pixel_of(idx: Tensor, ky: int, kx: int) -> Tensor:
        return (image[idx, None, None] * h + rows[idx, :ky, None]) * w + cols[idx, None, :kx]

    # rois of one window size together, each group in chunks of about GATHER_CHUNK elements
    side, order = torch.sort(torch.maximum(span_y, span_x))
    _, counts = torch.unique_consecutive(side, return_counts=True)
    groups = []
    for group in torch.split(order, counts.tolist()):
        ky, kx = int(span_y[group].max()), int(span_x[group].max())
        groups.append((group, ky, kx, max(1, GATHER_CHUNK // (c * ky * kx))))
    return pixel_of, weight_y, weight_x, groups


def roi_align_gathered_backward(grad: Tensor, rois: Tensor, feature_shape, output_size,
                                scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """The gradient of ``roi_align`` with respect to its features ``(N, C, H, W)`` (returned
    in channels-last layout), given ``grad`` of its result ``(R, C, ph, pw)``: each roi's
    window gradient from two small matrix products with the transposed weights of
    ``_roi_windows``, added into the map with ``index_add_`` of whole channel rows. The
    transpose of ``roi_align_gathered``, equal to torchvision's backward up to the order of
    float sums, and several times faster on a CPU (torchvision's runs on one thread)."""
    n, c, h, w = feature_shape
    ph, pw = output_size
    out = grad.new_zeros((n * h * w, c))
    if rois.shape[0]:
        pixel_of, weight_y, weight_x, groups = _roi_windows(
            rois.to(grad.dtype), (h, w, c), output_size, scale, sampling_ratio, aligned)
        rows = grad.permute(0, 2, 3, 1)  # (R, ph, pw, C)
        for group, ky, kx, per_chunk in groups:
            for idx in torch.split(group, per_chunk):
                r = idx.numel()
                # [r, 1, kx, pw] @ [r, ph, pw, C] -> [r, ph, kx, C]
                by_cols = torch.matmul(weight_x[idx, None, :, :kx].transpose(2, 3), rows[idx])
                # [r, ky, ph] @ [r, ph, kx * C] -> [r, ky, kx * C]
                window = torch.bmm(weight_y[idx, :, :ky].transpose(1, 2),
                                   by_cols.reshape(r, ph, kx * c))
                out.index_add_(0, pixel_of(idx, ky, kx).view(-1), window.view(-1, c))
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


class _RoIAlignCPU(torch.autograd.Function):
    """torchvision's RoIAlign forward, ``roi_align_gathered_backward`` as its backward."""

    @staticmethod
    def forward(ctx, feature, rois, output_size, scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (tuple(feature.shape), output_size, scale, sampling_ratio, aligned)
        return roi_align(feature, rois, output_size, scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        return (roi_align_gathered_backward(grad, rois, *ctx.args),
                None, None, None, None, None)


def roi_align_trainable(feature: Tensor, rois: Tensor, output_size, scale: float,
                        sampling_ratio: int, aligned: bool) -> Tensor:
    """``roi_align`` with a backward for CPU training (``roi_align_gathered_backward``)."""
    return _RoIAlignCPU.apply(feature, rois, tuple(output_size), scale, sampling_ratio, aligned)


def roi_align_gathered(feature: Tensor, rois: Tensor, output_size, scale: float,
                       sampling_ratio: int, aligned: bool, out: Optional[Tensor] = None,
                       out_rows: Optional[Tensor] = None) -> Tensor:
    """torchvision's ``roi_align`` (same arguments; float32 or float64 out, any float
    features; the result in channels-last layout), computed as: gather each roi's window of
    feature rows and columns from the channels-last map (channels contiguous), then two small
    matrix products with the per-roi row and column weights of ``_axis_weights``. Equal to
    torchvision's kernel up to the order of float sums; threaded by torch's own gather and
    batched matmul.

    With ``out`` (channels-last ``(M, C, S, S)``, the rois' dtype) and ``out_rows`` (``(R,)``),
    roi ``i`` is written to ``out[out_rows[i]]`` and ``out`` is returned (a multi-level pooler's
    levels write their rows of one result, with no second copy)."""
    n, c, h, w = feature.shape
    ph, pw = output_size
    dtype = rois.dtype
    nhwc = feature.permute(0, 2, 3, 1)  # a view for a channels_last map, else one copy
    nhwc = nhwc if nhwc.is_contiguous() else nhwc.contiguous()
    pixels = nhwc.view(n * h * w, c)
    if out is None:
        if out_rows is not None:
            raise ValueError("out_rows needs out (the result the rows are of)")
        out = torch.empty((rois.shape[0], c, ph, pw), dtype=dtype,
                          memory_format=torch.channels_last)
    result = out.permute(0, 2, 3, 1)  # (M, S, S, C), contiguous
    if not result.is_contiguous() or out.dtype != dtype or out.shape[1:] != (c, ph, pw):
        raise ValueError(f"out must be channels-last {dtype} (M, {c}, {ph}, {pw}), got "
                         f"{out.dtype} {tuple(out.shape)}")
    if rois.shape[0] == 0:
        return out
    pixel_of, weight_y, weight_x, groups = _roi_windows(rois, (h, w, c), output_size, scale,
                                                        sampling_ratio, aligned)
    # the windows of each chunk are gathered into one buffer, reused chunk after chunk
    scratch = nhwc.new_empty(max(min(p, g.numel()) * ky * kx * c for g, ky, kx, p in groups))
    for group, ky, kx, per_chunk in groups:
        for idx in torch.split(group, per_chunk):
            # one flat index per window pixel: index_select copies whole channel rows (about
            # half the time of the same gather by advanced indexing, which copies element by
            # element)
            pixel = pixel_of(idx, ky, kx)
            window = torch.index_select(pixels, 0, pixel.view(-1),
                                        out=scratch[:pixel.numel() * c].view(-1, c))
            window = window.to(dtype).view(idx.numel(), ky, kx * c)
            by_rows = torch.bmm(weight_y[idx, :, :ky], window).view(idx.numel(), ph, kx, c)
            # [r, 1, pw, kx] @ [r, ph, kx, c] -> [r, ph, pw, c], rows of channels
            pooled = torch.matmul(weight_x[idx, None, :, :kx], by_rows)
            result.index_copy_(0, idx if out_rows is None else out_rows[idx], pooled)
    return out
