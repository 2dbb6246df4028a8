"""RoIAlign at CPU inference (gathers and small matrix products over channels-last features)
against torchvision's kernel, and the pooler's level routing with it."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from detection.modeling.poolers import ROIPooler, roi_align_gathered, roi_align_trainable


def random_rois(n: int, h: int, w: int, stride: float, generator: torch.Generator) -> torch.Tensor:
    """Boxes in image pixels of every kind RoIAlign meets: inside, across and beyond the
    border, degenerate (zero width or height), and one image index of two."""
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w, h]) * stride * 1.2 - 10
    wh = torch.rand(n, 2, generator=generator) * 30 * stride
    wh[:8] = 0  # degenerate
    wh[8:16, 0] = 0
    xy[16:20] = torch.tensor([w, h]) * stride + 5  # beyond the map
    batch = torch.randint(0, 2, (n, 1), generator=generator).float()
    return torch.cat([batch, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2, 3])
@pytest.mark.parametrize("size", [(37, 53), (9, 14)])
def test_matches_torchvision(aligned, sampling_ratio, size):
    g = torch.Generator().manual_seed(sampling_ratio * 10 + aligned)
    h, w = size
    feature = torch.randn(2, 24, h, w, generator=g)
    rois = random_rois(120, h, w, 8.0, g)
    expected = roi_align(feature, rois, (7, 7), 1 / 8, sampling_ratio, aligned)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = roi_align_gathered(feature.contiguous(memory_format=layout), rois, (7, 7), 1 / 8,
                                 sampling_ratio, aligned)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the comparison is not vacuous: most boxes inside the map pool non-zero features
    assert expected[20:].abs().amax(dim=(1, 2, 3)).gt(0).float().mean() > 0.5


def test_other_dtypes_and_output_size():
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(2, 8, 21, 30, generator=g, dtype=torch.float64)
    rois = random_rois(50, 21, 30, 4.0, g).double()
    expected = roi_align(feature, rois, (14, 14), 0.25, 2, True)
    torch.testing.assert_close(roi_align_gathered(feature, rois, (14, 14), 0.25, 2, True),
                               expected, rtol=1e-10, atol=1e-10)
    # bf16 features (a bf16 backbone) are pooled in float32, as torchvision pools them upcast
    low = feature.to(torch.bfloat16)
    got = roi_align_gathered(low, rois.float(), (14, 14), 0.25, 2, True)
    torch.testing.assert_close(got, roi_align(low.float(), rois.float(), (14, 14), 0.25, 2,
                                              True), rtol=1e-5, atol=1e-5)


def test_pooler_matches_torchvision_multiscale():
    """Our pooler at inference (gathered path) and in autograd (torchvision's kernel) against
    torchvision's MultiScaleRoIAlign on four levels."""
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 8, 512 // s, 640 // s, generator=g).contiguous(
        memory_format=torch.channels_last) for s in (4, 8, 16, 32)]
    boxes = []
    for _ in range(2):
        xy = torch.rand(90, 2, generator=g) * torch.tensor([600.0, 480.0])
        wh = torch.rand(90, 2, generator=g) ** 2 * 600 + 4
        xy[:10], wh[:10] = xy[:10] / 30, wh[:10] / 4 + 470  # some for the coarsest level
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=torch.tensor([639.0, 511.0]))], 1))
    ref = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = ref({str(i): f for i, f in enumerate(feats)}, boxes, [(512, 640)] * 2)
    pooler = ROIPooler(output_size=7, strides=(4, 8, 16, 32), sampling_ratio=2, aligned=False,
                       eps=1e-6, eps_inside_log=False)
    levels = pooler.levels(torch.cat([torch.zeros(180, 1), torch.cat(boxes)], 1))
    assert levels.unique().tolist() == [0, 1, 2, 3]  # every level has boxes
    with torch.no_grad():
        got = pooler(feats, boxes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    leaf = [f.detach().requires_grad_() for f in feats]
    trained = pooler(leaf, boxes)
    torch.testing.assert_close(trained.detach(), expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn(trained.shape, generator=g)
    (trained * weights).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in leaf)
    # the same gradients as torchvision's pooler's
    ref_leaf = [f.detach().requires_grad_() for f in feats]
    (ref({str(i): f for i, f in enumerate(ref_leaf)}, boxes, [(512, 640)] * 2)
     * weights).sum().backward()
    for ours, theirs in zip(leaf, ref_leaf):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2, 3])
@pytest.mark.parametrize("size", [(37, 53), (9, 14)])
def test_training_backward_matches_torchvision(aligned, sampling_ratio, size):
    """The CPU training kernel's gradient (``roi_align_gathered_backward``) against
    torchvision's backward, in float64 (the same sums in another order), on boxes of every
    kind: inside, across and beyond the border, degenerate; both image indices."""
    g = torch.Generator().manual_seed(sampling_ratio * 10 + aligned + 100)
    h, w = size
    feature = torch.randn(2, 24, h, w, generator=g, dtype=torch.float64)
    rois = random_rois(120, h, w, 8.0, g).double()
    upstream = torch.randn(120, 24, 7, 7, generator=g, dtype=torch.float64)
    grads = []
    for kernel in (roi_align, roi_align_trainable):
        leaf = feature.clone().requires_grad_()
        out = kernel(leaf, rois, (7, 7), 1 / 8, sampling_ratio, aligned)
        (out * upstream).sum().backward()
        grads.append(leaf.grad)
    expected, got = grads
    assert got.shape == expected.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert float(expected.abs().gt(0).float().mean()) > 0.3  # not a comparison of zeros


def test_empty_rois():
    feature = torch.randn(1, 4, 10, 10)
    pooler = ROIPooler(output_size=7, strides=(4,), sampling_ratio=0)
    with torch.no_grad():
        out = pooler([feature], [torch.zeros(0, 4)])
    assert out.shape == (0, 4, 7, 7)


def test_gathered_writes_given_rows_of_out():
    """``out``/``out_rows``: each roi lands in its row, other rows stay as they were, and an
    ``out`` of the wrong layout is refused (not written in a scrambled order)."""
    g = torch.Generator().manual_seed(5)
    feature = torch.randn(2, 6, 20, 24, generator=g).contiguous(memory_format=torch.channels_last)
    rois = random_rois(12, 20, 24, 4.0, g)
    expected = roi_align(feature, rois, (7, 7), 0.25, 0, True)
    out = torch.full((20, 6, 7, 7), -7.0).contiguous(memory_format=torch.channels_last)
    rows = torch.randperm(20, generator=g)[:12]
    got = roi_align_gathered(feature, rois, (7, 7), 0.25, 0, True, out=out, out_rows=rows)
    assert got is out
    torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)
    others = torch.ones(20, dtype=torch.bool)
    others[rows] = False
    assert out[others].eq(-7.0).all()
    empty = roi_align_gathered(feature, rois[:0], (7, 7), 0.25, 0, True)
    assert empty.shape == (0, 6, 7, 7)
    with pytest.raises(ValueError, match="out_rows needs out"):
        roi_align_gathered(feature, rois, (7, 7), 0.25, 0, True, out_rows=rows)
    with pytest.raises(ValueError, match="channels-last"):
        roi_align_gathered(feature, rois, (7, 7), 0.25, 0, True, out=torch.empty(12, 6, 7, 7),
                           out_rows=torch.arange(12))
