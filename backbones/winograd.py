"""Winograd F(4x4, 3x3) convolution for CPU float32 inference (Lavin and Gray, CVPR 2016).

A 3x3 stride-1 convolution computes each 4x4 output tile from a 6x6 input tile with
36 element-wise products in the transformed domain instead of 144 multiply-adds, so the
channel-mixing work (36 batched matrix products of tiles x C_in by C_in x C_out) is 4x
smaller than the direct convolution's. The transforms are small dense products on top
(``B^T`` of 6x6 along the input tiles' rows, then along their columns; ``kron(A^T, A^T)``
of 16x36 on the products), done chunk by chunk of tiles, each chunk's band of input rows
padded in its own buffer, so that a chunk's data are still in the cache when the next step
reads them. The chunks' tiles, transforms and products are written into one buffer per thread
(``_workspace``, kept between calls, about 42 MB for an R50-FPN at 800x1067) instead of five
new tensors per chunk: in A/Bs of the whole R50-FPN Faster R-CNN at 800x1067 (7-9 rounds,
2026-12-03, a noisy day) 2.258 s against 2.322 s and 2.249 against 2.192 on the default heap,
1.954 against 2.023 and 2.018 against 2.234 with the retained heap: a few percent, within
the day's noise, and no allocation per chunk.

Measured on this project's 2-core CPU against oneDNN's direct convolution (channels-last,
float32), 256 -> 256 channels: 0.55-0.75x the time at FPN sizes from 200x272 to 25x34; 512
-> 512 at 25x34: about 0.6x; at 128 channels it came out between 0.8x and 1.2x from run to
run, at 64 channels 1.6-2.5x, so it is used from 256 input and output channels on
(``python benchmarks/bench_winograd.py``). The round-off is larger than the direct
convolution's (about 4x here, 5e-5 against 1.5e-5 on outputs of unit scale), still float32
round-off: detections agree with the direct model to the parity tests' tolerances.

Only float32: in bf16 the transforms' coefficients (up to 8 and 25 in the products) cost
more precision than bf16 has.
"""

import threading
from typing import Optional

import torch
from torch import Tensor

# F(4, 3) with interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))

# Tiles per chunk (9 MB of transformed input at 256 channels). Chosen by timing chunks of
# 128-1088 tiles at FPN sizes here: `python benchmarks/bench_winograd.py`.
CHUNK_TILES = 256
MIN_CHANNELS = 256


def winograd_supported(conv: torch.nn.Conv2d, min_channels: int = MIN_CHANNELS) -> bool:
    """A 3x3, stride-1, padding-1, undilated, ungrouped conv with at least ``min_channels``
    input and output channels (where it was measured to pay)."""
    return (tuple(conv.weight.shape[-2:]) == (3, 3) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and conv.weight.shape[0] >= min_channels
            and conv.weight.shape[1] >= min_channels)


def transform_weight(weight: Tensor) -> Tensor:
    """``G w G^T`` of a ``(C_out, C_in, 3, 3)`` weight, as ``(36, C_in, C_out)`` float32
    (computed in float64)."""
    g = torch.tensor(_G, dtype=torch.float64)
    u = torch.einsum("ik,ockl,jl->ijco", g, weight.detach().to(torch.float64), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


def _kron(m) -> Tensor:
    t = torch.tensor(m, dtype=torch.float64)
    return torch.kron(t, t).to(torch.float32)


_BT_F32 = torch.tensor(_BT, dtype=torch.float32)  # on input tiles, along rows then columns
_KA = _kron(_AT)  # (16, 36) on products


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
    ``(N, C_in, H, W)``, with ``weight_t = transform_weight(w)``. Returns a channels-last
    ``(N, C_out, H, W)`` tensor."""
    chunk_tiles = chunk_tiles or CHUNK_TILES
    n, c, h, w = x.shape
    if weight_t.shape[1] != c:
        raise ValueError(f"input has {c} channels, the weight {weight_t.shape[1]}")
    c_out = weight_t.shape[2]
    th, tw = (h + 3) // 4, (w + 3) // 4
    wp = 4 * tw + 2
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
    bt = _BT_F32.expand(6, 6, 6)
    band = x.new_empty(0)
    most = max((i1 - i0) * r * tw for i0, i1, _, r in chunks)
    space = _workspace(36 * most * (3 * c + c_out) + 16 * most * c_out, x.dtype)
    for i0, i1, r0, r in chunks:
        m = i1 - i0
        t = m * r * tw
        bufs, at = [], 0
        for size in (36 * t * c, 36 * t * c, 36 * t * c, 36 * t * c_out, 16 * t * c_out):
            bufs.append(space[at:at + size])
            at += size
        # the chunk's rows of the zero-padded input (one pixel before, the rest of the last
        # tile after), copied into a band that stays in the cache (a padded copy of the whole
        # map went through memory: 10-15% slower at 200x272)
        band_rows = 4 * r + 2
        if band.shape[:2] != (m, band_rows):
            band = x.new_empty((m, band_rows, wp, c))
            band[:, :, 0].zero_()
            band[:, :, w + 1:].zero_()
        top = 4 * r0 - 1  # the image row of the band's first row
        y0, y1 = max(top, 0), min(top + band_rows, h)
        band[:, :y0 - top, 1:w + 1].zero_()
        band[:, y0 - top:y1 - top, 1:w + 1].copy_(x[i0:i1, y0:y1])
        band[:, y1 - top:, 1:w + 1].zero_()
        sn, sh, sw, sc = band.stride()
        tiles = bufs[0].view(6, 6, m, r, tw, c)
        tiles.copy_(band.as_strided(  # (6, 6) tile elements of every tile in the chunk
            (6, 6, m, r, tw, c), (sh, sw, sn, 4 * sh, 4 * sw, sc)))
        # B^T d B in two passes of 6x6 products (a third of kron(B^T, B^T)'s work; measured
        # 0.7x its time)
        rows_done = torch.mm(_BT_F32, tiles.view(6, -1), out=bufs[1].view(6, -1))
        v = torch.bmm(bt, rows_done.view(6, 6, -1), out=bufs[2].view(6, 6, -1))
        prod = torch.bmm(v.view(36, t, c), weight_t, out=bufs[3].view(36, t, c_out))
        y = torch.mm(_KA, prod.view(36, -1), out=bufs[4].view(16, -1))
        y = y.view(4, 4, m, r, tw, c_out)
        y = y.permute(2, 3, 0, 4, 1, 5)  # (m, r, 4, tw, 4, C_out)
        rows_out = min(4 * r, h - 4 * r0)
        dst = out[i0:i1, 4 * r0:4 * r0 + rows_out]
        if rows_out == 4 * r and w == 4 * tw:
            dst6 = dst.view(m, r, 4, tw, 4, c_out)
            if bias is not None:
                torch.add(y, bias, out=dst6)
            else:
                dst6.copy_(y)
        else:
            full = y.reshape(m, 4 * r, 4 * tw, c_out)[:, :rows_out, :w]
            if bias is not None:
                torch.add(full, bias, out=dst)
            else:
                dst.copy_(full)
        if other is not None:
            dst.add_(other[i0:i1, 4 * r0:4 * r0 + rows_out])
        if relu:
            dst.relu_()
    return out.permute(0, 3, 1, 2)
