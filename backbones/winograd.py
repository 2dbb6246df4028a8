"""Winograd F(4x4, 3x3) and F(6x6, 3x3) convolution for CPU float32 inference (Lavin and
Gray, CVPR 2016).

A 3x3 stride-1 convolution computes each m x m output tile from an (m+2) x (m+2) input tile:
F(4x4, 3x3) with 36 element-wise products in the transformed domain instead of 144
multiply-adds, F(6x6, 3x3) with 64 instead of 324, so the channel-mixing work (batched matrix
products of tiles x C_in by C_in x C_out, one per element of the transformed tile) is 4x and
5.1x smaller than the direct convolution's. The input transform ``B^T`` (rows, then columns)
and the output transform ``A^T`` (``kron(A^T, A^T)`` for F(4x4), two passes for F(6x6)) run
chunk by chunk of tiles in one reused buffer per thread (``_workspace``), so that a chunk's
data are still in the cache at the next step.

It is used from 256 input and output channels on (``MIN_CHANNELS``), F(6x6) on maps of at
least ``F6_MIN_PIXELS``: below those, oneDNN's direct convolution was as fast or faster
(docs/benchmarks.md; ``python benchmarks/bench_winograd.py``). The round-off is about 4x the
direct convolution's for F(4x4) and 1.3-1.7x more for F(6x6), still float32 round-off.
Only float32: in bf16 the transforms' coefficients (up to 8 and 25) cost more precision than
bf16 has.
"""

import threading
from typing import Optional

import torch
from torch import Tensor

# Interpolation points of each tile size (the last point is infinity): F(4, 3)'s are Lavin and
# Gray's; F(6, 3)'s, with +-1/2, keep the coefficients of B^T and A^T at most 21/4 and 32.
POINTS = {4: (0, 1, -1, 2, -2), 6: (0, 1, -1, 2, -2, 1 / 2, -1 / 2)}

# Tiles per chunk (9 MB of transformed input at 256 channels). Chosen by timing chunks of
# 128-1088 tiles at FPN sizes here: `python benchmarks/bench_winograd.py`.
CHUNK_TILES = {4: 256, 6: 144}
MIN_CHANNELS = 256
# F(6x6, 3x3) from maps of this many pixels (P2 of an 800x1067 input has 54,400, P3 13,600,
# P4 3,400)
F6_MIN_PIXELS = 10_000


def cook_toom(m: int, points=None) -> tuple:
    """The matrices of Winograd's F(m, 3) in float64: ``A^T`` (m, n), ``G`` (n, 3) and ``B^T``
    (n, n), n = m + 2, from the n - 1 finite interpolation ``points`` (and infinity), so that
    ``A^T [(G g) * (B^T d)]`` is the correlation of ``d`` (n values) with ``g`` (3)."""
    points = POINTS[m] if points is None else points
    n = m + 2
    if len(points) != n - 1:
        raise ValueError(f"F({m}, 3) needs {n - 1} finite points, got {len(points)}")
    p = torch.tensor(points, dtype=torch.float64)
    at = torch.zeros(m, n, dtype=torch.float64)
    at[:, :n - 1] = p[None, :] ** torch.arange(m, dtype=torch.float64)[:, None]
    at[m - 1, n - 1] = 1
    g = torch.zeros(n, 3, dtype=torch.float64)
    bt = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n - 1):
        others = torch.cat([p[:j], p[j + 1:]])
        g[j] = p[j] ** torch.arange(3, dtype=torch.float64) / torch.prod(p[j] - others)
        bt[j, :n - 1] = _poly(others)
    g[n - 1, 2] = 1
    bt[n - 1] = _poly(p)
    return at, g, bt


def _poly(roots: Tensor) -> Tensor:
    """Coefficients of prod(x - r), lowest power first."""
    coef = torch.ones(1, dtype=torch.float64)
    for r in roots:
        coef = torch.cat([coef.new_zeros(1), coef]) - r * torch.cat([coef, coef.new_zeros(1)])
    return coef


class _Matrices:
    """One tile size's float32 transforms: ``B^T`` (for both passes over the input tiles),
    and ``A^T`` for the two output passes or its ``kron(A^T, A^T)`` for one."""

    def __init__(self, m: int) -> None:
        at, _, bt = cook_toom(m)
        self.m, self.n = m, m + 2
        self.bt = bt.to(torch.float32)
        self.at = at.to(torch.float32)
        self.kron_at = torch.kron(at, at).to(torch.float32)


_MATRICES = {m: _Matrices(m) for m in POINTS}


def winograd_supported(conv: torch.nn.Conv2d, min_channels: int = MIN_CHANNELS) -> bool:
    """A 3x3, stride-1, padding-1, undilated, ungrouped conv with at least ``min_channels``
    input and output channels (where it was measured to pay)."""
    return (tuple(conv.weight.shape[-2:]) == (3, 3) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and conv.weight.shape[0] >= min_channels
            and conv.weight.shape[1] >= min_channels)


def transform_weight(weight: Tensor, m: int = 4) -> Tensor:
    """``G w G^T`` of a ``(C_out, C_in, 3, 3)`` weight for F(m x m, 3x3), as
    ``((m + 2)^2, C_in, C_out)`` float32 (computed in float64)."""
    g = cook_toom(m)[1]
    u = torch.einsum("ik,ockl,jl->ijco", g, weight.detach().to(torch.float64), g)
    return u.reshape((m + 2) ** 2, weight.shape[1], weight.shape[0]).to(torch.float32) \
        .contiguous()


_LOCAL = threading.local()


def _workspace(numel: int, dtype: torch.dtype) -> Tensor:
    """A buffer of at least ``numel`` elements, this thread's, kept between calls (grown when
    a call needs more): the chunks' transformed tiles and products are written into it
    instead of into new tensors."""
    space = getattr(_LOCAL, "space", None)
    if space is None or space.numel() < numel or space.dtype != dtype:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of it
            _LOCAL.space = space = torch.empty(numel, dtype=dtype)
    return space


def winograd_conv3x3(x: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None,
                     relu: bool = False, other: Optional[Tensor] = None,
                     chunk_tiles: Optional[int] = None) -> Tensor:
    """``act(conv3x3(x, w, bias, padding=1) [+ other])`` for float32 CPU ``x`` of shape
    ``(N, C_in, H, W)``, with ``weight_t = transform_weight(w, m)``: F(m x m, 3x3), m (4 or 6)
    read from its shape. Returns a channels-last ``(N, C_out, H, W)`` tensor."""
    k = int(round(weight_t.shape[0] ** 0.5))
    mats = _MATRICES.get(k - 2)
    if mats is None or k * k != weight_t.shape[0]:
        raise ValueError(f"a transformed weight has 36 or 64 rows, not {weight_t.shape[0]}")
    ms, ns = mats.m, mats.n  # output and input tile sides
    chunk_tiles = chunk_tiles or CHUNK_TILES[ms]
    n, c, h, w = x.shape
    if weight_t.shape[1] != c:
        raise ValueError(f"input has {c} channels, the weight {weight_t.shape[1]}")
    c_out = weight_t.shape[2]
    th, tw = (h + ms - 1) // ms, (w + ms - 1) // ms
    wp = ms * tw + 2
    x = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view of a channels-last input
    out = torch.empty((n, h, w, c_out), dtype=x.dtype)
    if other is not None:
        other = other.permute(0, 2, 3, 1)
    # chunks: rows of tiles of one image, or whole images of few tiles
    per_image = th * tw
    if per_image >= chunk_tiles:
        rows = max(1, chunk_tiles // tw)
        chunks = [(i, i + 1, r0, min(rows, th - r0)) for i in range(n)
                  for r0 in range(0, th, rows)]
    else:
        images = max(1, chunk_tiles // per_image)
        chunks = [(i, min(i + images, n), 0, th) for i in range(0, n, images)]
    nn_ = ns * ns
    bt = mats.bt.expand(ns, ns, ns)
    at = mats.at.expand(ms, ms, ns)
    band = x.new_empty(0)
    most = max((i1 - i0) * r * tw for i0, i1, _, r in chunks)
    half_rows = 0 if ms == 4 else ms * ns  # the first of the output transform's two passes
    space = _workspace(nn_ * most * (3 * c + c_out) + (ms * ms + half_rows) * most * c_out,
                       x.dtype)
    for i0, i1, r0, r in chunks:
        m = i1 - i0
        t = m * r * tw
        bufs, used = [], 0
        for size in (nn_ * t * c, nn_ * t * c, nn_ * t * c, nn_ * t * c_out, ms * ms * t * c_out,
                     half_rows * t * c_out):
            bufs.append(space[used:used + size])
            used += size
        # the chunk's rows of the zero-padded input (one pixel before, the rest of the last
        # tile after), copied into a band that stays in the cache (a padded copy of the whole
        # map went through memory: 10-15% slower at 200x272)
        band_rows = ms * r + 2
        if band.shape[:2] != (m, band_rows):
            band = x.new_empty((m, band_rows, wp, c))
            band[:, :, 0].zero_()
            band[:, :, w + 1:].zero_()
        top = ms * r0 - 1  # the image row of the band's first row
        y0, y1 = max(top, 0), min(top + band_rows, h)
        band[:, :y0 - top, 1:w + 1].zero_()
        band[:, y0 - top:y1 - top, 1:w + 1].copy_(x[i0:i1, y0:y1])
        band[:, y1 - top:, 1:w + 1].zero_()
        sn, sh, sw, sc = band.stride()
        tiles = bufs[0].view(ns, ns, m, r, tw, c)
        tiles.copy_(band.as_strided(  # (ns, ns) tile elements of every tile in the chunk
            (ns, ns, m, r, tw, c), (sh, sw, sn, ms * sh, ms * sw, sc)))
        # B^T d B in two passes of small products (for F(4x4) a third of kron(B^T, B^T)'s
        # work; measured 0.7x its time)
        rows_done = torch.mm(mats.bt, tiles.view(ns, -1), out=bufs[1].view(ns, -1))
        v = torch.bmm(bt, rows_done.view(ns, ns, -1), out=bufs[2].view(ns, ns, -1))
        prod = torch.bmm(v.view(nn_, t, c), weight_t, out=bufs[3].view(nn_, t, c_out))
        if ms == 4:  # one product with kron(A^T, A^T) (two passes were no faster)
            y = torch.mm(mats.kron_at, prod.view(nn_, -1), out=bufs[4].view(16, -1))
        else:  # two passes (F(6x6): 20 ms against 30 ms for the kron at 200x272)
            half = torch.mm(mats.at, prod.view(ns, -1), out=bufs[5].view(ms, -1))
            y = torch.bmm(at, half.view(ms, ns, -1), out=bufs[4].view(ms, ms, -1))
        y = y.view(ms, ms, m, r, tw, c_out)
        y = y.permute(2, 3, 0, 4, 1, 5)  # (m, r, ms, tw, ms, C_out)
        rows_out = min(ms * r, h - ms * r0)
        dst = out[i0:i1, ms * r0:ms * r0 + rows_out]
        if rows_out == ms * r and w == ms * tw:
            dst6 = dst.view(m, r, ms, tw, ms, c_out)
            if bias is not None:
                torch.add(y, bias, out=dst6)
            else:
                dst6.copy_(y)
        else:
            full = y.reshape(m, ms * r, ms * tw, c_out)[:, :rows_out, :w]
            if bias is not None:
                torch.add(full, bias, out=dst)
            else:
                dst.copy_(full)
        if other is not None:
            dst.add_(other[i0:i1, ms * r0:ms * r0 + rows_out])
        if relu:
            dst.relu_()
    return out.permute(0, 3, 1, 2)
