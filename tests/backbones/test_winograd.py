"""Winograd F(4x4, 3x3) and F(6x6, 3x3) convolution: the same function as the direct 3x3 conv,
within float32 round-off, on every path of its tiling (row chunks, image chunks, edge tiles)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backbones.fused as fused_module
from backbones.fused import FusedConv2d, use_winograd
from backbones.winograd import cook_toom, transform_weight, winograd_conv3x3, winograd_supported


def _reference(x, w, b, relu, other):
    out = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    if other is not None:
        out = out + other.double()
    return out.clamp_min(0) if relu else out


@pytest.mark.parametrize("shape,chunk", [
    ((1, 24, 37, 29), 8),      # one image, chunks of rows, partial last tile row and column
    ((1, 24, 16, 20), 1000),   # one chunk, exact tiles
    ((1, 24, 37, 29), 24),     # chunks of 3 tile rows, the last of 1 (a smaller band)
    ((5, 16, 9, 6), 7),        # whole images, one per chunk
    ((5, 16, 9, 6), 13),       # batches of 2 whole images, the last batch short
    ((3, 16, 4, 4), 2),        # one tile per image
])
@pytest.mark.parametrize("relu,add,bias", [(True, False, True), (False, True, True),
                                           (True, True, False)])
@pytest.mark.parametrize("m", [4, 6])
def test_winograd_equals_direct_conv(shape, chunk, relu, add, bias, m):
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(19, c, 3, 3, generator=gen) / (3 * c ** 0.5)
    b = torch.randn(19, generator=gen) if bias else None
    other = torch.randn(n, 19, h, w, generator=gen) if add else None
    want = _reference(x, weight, b, relu, other)
    got = winograd_conv3x3(x, transform_weight(weight, m), b, relu, other, chunk_tiles=chunk)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    err = (got.double() - want).abs().max().item()
    direct = F.conv2d(x, weight, b, padding=1)
    if other is not None:
        direct = direct + other
    direct_err = ((direct.clamp_min(0) if relu else direct).double() - want).abs().max().item()
    # float32 round-off: a few times the direct conv's (F(6x6) 1.4-2x F(4x4)'s: larger
    # transform coefficients), far below any wrong tap or tile (errors of order 0.1-1 here)
    assert err < max({4: 20, 6: 40}[m] * direct_err, 1e-5), (err, direct_err)
    # a channels-last input gives the same result
    got_cl = winograd_conv3x3(x.contiguous(memory_format=torch.channels_last),
                              transform_weight(weight, m), b, relu, other, chunk_tiles=chunk)
    torch.testing.assert_close(got_cl, got, rtol=0, atol=0)


def test_workspace_is_reused_across_calls_modes_and_threads():
    """The chunks write into one buffer per thread, kept between calls: a call in inference
    mode, then one under no_grad, then a larger map, then another thread, each give the result
    of a fresh call (one buffer would have broken an inference-mode tensor's rules, or two
    threads sharing it their results)."""
    import threading

    gen = torch.Generator().manual_seed(1)
    weight = transform_weight(torch.randn(24, 16, 3, 3, generator=gen) / 12)
    small, large = torch.randn(2, 16, 9, 14, generator=gen), torch.randn(1, 16, 30, 41,
                                                                          generator=gen)
    with torch.inference_mode():
        first = winograd_conv3x3(small, weight, chunk_tiles=5)
    with torch.no_grad():
        again = winograd_conv3x3(small, weight, chunk_tiles=5)
        big = winograd_conv3x3(large, weight, chunk_tiles=64)
        after_big = winograd_conv3x3(small, weight, chunk_tiles=5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(after_big, first, rtol=0, atol=0)
    results = {}

    def run(name, x):
        with torch.no_grad():
            for _ in range(20):
                results[name] = winograd_conv3x3(x, weight, chunk_tiles=7)

    threads = [threading.Thread(target=run, args=("small", small)),
               threading.Thread(target=run, args=("large", large))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(results["small"], first, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(results["large"], winograd_conv3x3(large, weight, chunk_tiles=7),
                                   rtol=0, atol=1e-6)
    assert big.shape == (1, 24, 30, 41)


def test_winograd_rejects_wrong_channels_and_tiles():
    w = transform_weight(torch.randn(8, 4, 3, 3))
    with pytest.raises(ValueError, match="5 channels, the weight 4"):
        winograd_conv3x3(torch.randn(1, 5, 8, 8), w)
    with pytest.raises(ValueError, match="36 or 64 rows, not 49"):  # no F(5x5, 3x3)
        winograd_conv3x3(torch.randn(1, 4, 8, 8), torch.randn(49, 4, 8))


def test_cook_toom_matrices():
    """F(4, 3) from the points 0, +-1, +-2 is Lavin and Gray's published transform, entry for
    entry; F(6, 3) (points 0, +-1, +-2, +-1/2) computes the 1-D correlation exactly in float64,
    as F(4, 3) does."""
    at, g, bt = cook_toom(4)
    assert torch.equal(bt, torch.tensor(
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64))
    assert torch.equal(g, torch.tensor(
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64))
    assert torch.equal(at, torch.tensor(
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
        dtype=torch.float64))
    gen = torch.Generator().manual_seed(2)
    for m in (4, 6):
        at, g, bt = cook_toom(m)
        assert at.shape == (m, m + 2) and g.shape == (m + 2, 3) and bt.shape == (m + 2, m + 2)
        d = torch.randn(m + 2, generator=gen, dtype=torch.float64)
        w = torch.randn(3, generator=gen, dtype=torch.float64)
        want = torch.stack([d[i:i + 3] @ w for i in range(m)])
        torch.testing.assert_close(at @ ((g @ w) * (bt @ d)), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="F\\(6, 3\\) needs 7 finite points, got 5"):
        cook_toom(6, (0, 1, -1, 2, -2))


def test_only_3x3_stride1_wide_convs_are_supported():
    assert winograd_supported(nn.Conv2d(256, 256, 3, padding=1))
    assert winograd_supported(nn.Conv2d(32, 48, 3, padding=1), min_channels=32)
    assert not winograd_supported(nn.Conv2d(128, 256, 3, padding=1))  # below 256 channels
    assert not winograd_supported(nn.Conv2d(256, 256, 3, stride=2, padding=1))
    assert not winograd_supported(nn.Conv2d(256, 256, 1))
    assert not winograd_supported(nn.Conv2d(256, 256, 3, padding=2, dilation=2))
    assert not winograd_supported(nn.Conv2d(256, 256, 3, padding=1, groups=32))


def test_fused_conv_runs_winograd_where_it_pays(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, stride=2,
                                                                      padding=1))
    fused = nn.Sequential(FusedConv2d(model[0], relu=True), FusedConv2d(model[1], relu=False))
    assert use_winograd(fused, min_channels=32) == 1  # the stride-2 conv stays direct
    calls = []
    real = fused_module.winograd_conv3x3
    monkeypatch.setattr(fused_module, "winograd_conv3x3",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = torch.randn(1, 32, 40, 52)  # 10 x 13 tiles
    with torch.no_grad():
        got = fused(x)
        want = model[1](torch.relu(model[0](x)))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert calls == [x.shape]
        fused(torch.randn(1, 32, 20, 24))  # 5 x 6 tiles: too few, direct
        fused(torch.randn(8, 32, 14, 14))  # a batch of small maps (RoIs): direct
        fused(torch.randn(2, 32, 40, 52))  # a batch of images: Winograd
    assert calls == [x.shape, (2, 32, 40, 52)]
    # F(4x4) everywhere below F6_MIN_PIXELS: no F(6x6) weight was made
    assert fused[0].weight_winograd6 is None
    # the transformed weight is not part of the state dict
    assert not any("winograd" in k for k in fused.state_dict())
    # under autograd the plain conv runs, so gradients flow
    x.requires_grad_(True)
    fused(x).sum().backward()
    assert x.grad is not None and len(calls) == 2


def test_fused_conv_runs_f6_on_large_maps(monkeypatch):
    """From ``F6_MIN_PIXELS`` on, the conv runs as F(6x6, 3x3), with its transformed weight
    made at the first such map and kept (also when made in inference mode, it serves calls
    under no_grad); smaller maps keep F(4x4); ``use_winograd`` again drops the F(6x6) weight
    (the weights may have changed)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    fused = FusedConv2d(conv, relu=True)
    assert fused.use_winograd(min_channels=32)
    monkeypatch.setattr(fused_module, "F6_MIN_PIXELS", 40 * 52)
    rows = []
    real = fused_module.winograd_conv3x3
    monkeypatch.setattr(fused_module, "winograd_conv3x3",
                        lambda x, w, *a, **k: rows.append(w.shape[0]) or real(x, w, *a, **k))
    large, small = torch.randn(1, 32, 40, 52), torch.randn(1, 32, 39, 52)
    with torch.inference_mode():
        got = fused(large)
    assert rows == [64] and fused.weight_winograd6.shape == (64, 32, 32)
    assert not fused.weight_winograd6.is_inference()
    made = fused.weight_winograd6
    with torch.no_grad():
        torch.testing.assert_close(got, torch.relu(conv(large)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(small), torch.relu(conv(small)), rtol=1e-4, atol=1e-4)
        fused(large)
    assert rows == [64, 36, 64] and fused.weight_winograd6 is made
    fused.use_winograd(min_channels=32)
    assert fused.weight_winograd6 is None
