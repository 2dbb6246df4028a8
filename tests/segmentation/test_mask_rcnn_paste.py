"""Mask pasting: hand-derived pixels for both conventions, and agreement with torchvision's own
paste and with a grid_sample reference of detectron2's."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segmentation.mask_rcnn import paste_masks

BOX = torch.tensor([[10.0, 20.0, 30.0, 50.0]])
SIZE = (64, 64)


def _region(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Bool (64, 64) image, True on rows y0..y1-1 and columns x0..x1-1."""
    out = torch.zeros(SIZE, dtype=torch.bool)
    out[y0:y1, x0:x1] = True
    return out


def test_detectron2_all_ones_fills_exactly_the_box():
    # Pixel centre x + 0.5 samples mask cell u = (x + 0.5 - 10) / 20 * 28 - 0.5: x = 10 gives
    # u = 0.2 and x = 29 gives 26.8 (inside: 1); x = 9 gives -1.2 and x = 30 gives 28.2 (both
    # neighbours outside the mask: 0). Rows, 30 px for 28 cells: u = (y + 0.5 - 20) / 30 * 28
    # - 0.5; y = 19 gives -29/30 (1/30 of cell 0), y = 20 gives -1/30 (29/30 of cell 0),
    # y = 21..48 lie inside, and y = 49, 50 mirror y = 20, 19.
    out = paste_masks(torch.ones(1, 28, 28), BOX, SIZE, mode="detectron2")[0].double()
    col = torch.zeros(64, dtype=torch.float64)
    col[10:30] = 1
    row = torch.zeros(64, dtype=torch.float64)
    row[21:49] = 1
    row[19], row[20], row[49], row[50] = 1 / 30, 29 / 30, 29 / 30, 1 / 30
    assert torch.allclose(out, row[:, None] * col[None, :], atol=1e-6)
    assert torch.equal(out >= 0.5, _region(20, 50, 10, 30))  # exactly the box's pixels


def test_detectron2_half_mask_fills_half_the_box():
    mask = torch.zeros(1, 28, 28)
    mask[:, :, :14] = 1  # left half
    out = paste_masks(mask, BOX, SIZE, mode="detectron2")[0]
    # x = 19: u = 12.8 (cells 12, 13: 1); x = 20: u = 14.2 (cells 14, 15: 0)
    assert torch.equal(out >= 0.5, _region(20, 50, 10, 20))


def test_torchvision_all_ones_by_hand():
    # Padding by one cell makes a 30 x 30 mask (ones inside) and grows the box by 30 / 28
    # about its centre: x 20 -+ 10.714 -> [9.29, 30.71] -> ints 9..30 (22 px); y 35 -+ 16.07
    # -> ints 18..51 (34 px). Columns: source s = (d + 0.5) * 30 / 22 - 0.5, so the first and
    # last column read 2/11 of a one; the others 1. Rows: s = (d + 0.5) * 30 / 34 - 0.5: the
    # first row clamps to padding cell 0 (0), the second reads 0.8235 (14/17), and
    # symmetrically at the bottom.
    out = paste_masks(torch.ones(1, 28, 28), BOX, SIZE, mode="torchvision")[0].double()
    col = torch.zeros(64, dtype=torch.float64)
    col[9], col[30], col[10:30] = 2 / 11, 2 / 11, 1
    row = torch.zeros(64, dtype=torch.float64)
    row[18], row[51], row[19], row[50], row[20:50] = 0, 0, 14 / 17, 14 / 17, 1
    assert torch.allclose(out, row[:, None] * col[None, :], atol=1e-6)
    assert torch.equal(out >= 0.5, _region(19, 51, 10, 30))


def test_torchvision_half_mask_fills_half_the_box():
    mask = torch.zeros(1, 28, 28)
    mask[:, :, :14] = 1
    out = paste_masks(mask, BOX, SIZE, mode="torchvision")[0]
    # column d = 10 (x = 19) reads padded cells 13.82 -> 1; d = 11 (x = 20) 15.18 -> 0
    assert torch.equal(out >= 0.5, _region(19, 51, 10, 20))


def _random_case(n: int = 12, seed: int = 0, outside: bool = False):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 1, 28, 28, generator=gen)
    xy = torch.rand(n, 2, generator=gen) * 70 - 10  # some boxes cross the border
    wh = torch.rand(n, 2, generator=gen) * 50 + 12
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([5.2, 6.7, 5.9, 7.1])  # thinner than a pixel
    if outside:  # wholly right of the (70, 80) image (torchvision's own paste fails on it)
        boxes[1] = torch.tensor([95.0, 3.0, 130.0, 40.0])
    return masks, boxes


def test_torchvision_mode_equals_torchvision_paste():
    masks, boxes = _random_case()
    ref = paste_masks_in_image(masks, boxes, (70, 80))[:, 0]
    ours = paste_masks(masks, boxes, (70, 80), mode="torchvision")
    assert ours.shape == ref.shape == (12, 70, 80)
    assert (ours - ref).abs().max() < 1e-5


def test_detectron2_mode_equals_grid_sample_reference():
    masks, boxes = _random_case(seed=1, outside=True)
    h, w = 70, 80
    x0, y0, x1, y1 = boxes.split(1, dim=1)  # (N, 1) each
    gx = ((torch.arange(w) + 0.5)[None] - x0) / (x1 - x0) * 2 - 1  # (N, W)
    gy = ((torch.arange(h) + 0.5)[None] - y0) / (y1 - y0) * 2 - 1  # (N, H)
    grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], 3)
    ref = F.grid_sample(masks, grid, align_corners=False)[:, 0]
    ours = paste_masks(masks, boxes, (h, w), mode="detectron2")
    assert (ours - ref).abs().max() < 1e-5


def test_a_box_outside_the_image_pastes_nothing():
    masks, boxes = _random_case(outside=True)
    inside = paste_masks(masks, _random_case()[1], (70, 80), mode="torchvision")
    ours = paste_masks(masks, boxes, (70, 80), mode="torchvision")
    assert not ours[1].any() and torch.equal(ours[2:], inside[2:])


def test_empty_and_bad_inputs():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)
    with pytest.raises(ValueError, match="paste mode"):
        paste_masks(torch.ones(1, 28, 28), BOX, SIZE, mode="nearest")
    with pytest.raises(ValueError, match=r"boxes must be \(2, 4\)"):
        paste_masks(torch.ones(2, 28, 28), BOX, SIZE)
