"""The panoptic merge on constructed instance and semantic outputs gives the map worked out by
hand: score order, the overlap rule (exactly half kept, more dropped), the score threshold,
only unassigned pixels for stuff, and the stuff area limit."""

import pytest
import torch

from segmentation.panoptic.merge import combine_semantic_and_instances


def _mask(*pixels, shape=(4, 6)):
    m = torch.zeros(shape, dtype=torch.bool)
    for r, c in pixels:
        m[r, c] = True
    return m


def test_merge_by_hand():
    semantic = torch.tensor([[1, 1, 1, 2, 2, 2],
                             [1, 0, 0, 2, 2, 2],
                             [1, 0, 0, 0, 2, 3],
                             [1, 1, 1, 1, 2, 3]])
    masks = torch.stack([
        _mask((0, 0), (0, 1), (1, 0), (1, 1)),  # C: score 0.7, class 0
        _mask((1, 1), (1, 2), (2, 1), (2, 2)),  # A: score 0.9, class 0
        _mask((3, 5)),                           # E: score 0.4, below the threshold
        _mask((1, 2), (1, 3), (2, 2), (2, 3)),  # B: score 0.8, class 1
        _mask((1, 3), (2, 3), (2, 4)),          # D: score 0.6, class 1
    ])
    scores = torch.tensor([0.7, 0.9, 0.4, 0.8, 0.6])
    labels = torch.tensor([0, 0, 0, 1, 1])
    pan, segs = combine_semantic_and_instances(
        masks=masks, scores=scores, labels=labels, semantic=semantic, overlap_thresh=0.5,
        stuff_area_limit=3, score_thresh=0.5)
    # By hand, in score order:
    #   A (0.9) takes its 4 pixels: segment 1.
    #   B (0.8): 2 of its 4 pixels are A's, 2/4 = 0.5 is not > 0.5, so it keeps its 2 free
    #     pixels (1,3), (2,3): segment 2.
    #   C (0.7): 1 of 4 taken (1,1), kept with (0,0), (0,1), (1,0): segment 3.
    #   D (0.6): 2 of 3 taken (1,3), (2,3): 0.67 > 0.5, dropped.
    #   E (0.4): below 0.5, stops the loop.
    # Stuff over the free pixels: label 1 has (0,2), (2,0), (3,0..3) = 6 >= 3: segment 4;
    #   label 2 has (0,3..5), (1,4), (1,5), (2,4), (3,4) = 7: segment 5; label 3 has 2 < 3:
    #   void. Label 0 (things) never becomes a segment.
    want = torch.tensor([[3, 3, 4, 5, 5, 5],
                         [3, 1, 1, 2, 5, 5],
                         [4, 1, 1, 2, 5, 0],
                         [4, 4, 4, 4, 5, 0]], dtype=torch.int32)
    assert torch.equal(pan, want)
    assert segs == [
        {"id": 1, "category_id": 0, "isthing": True, "score": pytest.approx(0.9), "area": 4,
         "instance_id": 1},
        {"id": 2, "category_id": 1, "isthing": True, "score": pytest.approx(0.8), "area": 2,
         "instance_id": 3},
        {"id": 3, "category_id": 0, "isthing": True, "score": pytest.approx(0.7), "area": 3,
         "instance_id": 0},
        {"id": 4, "category_id": 1, "isthing": False, "area": 6},
        {"id": 5, "category_id": 2, "isthing": False, "area": 7},
    ]
    # every pixel's area is accounted for
    for s in segs:
        assert int((pan == s["id"]).sum()) == s["area"]


def test_no_instances_and_a_zero_stuff_limit():
    semantic = torch.tensor([[0, 1], [2, 2]])
    pan, segs = combine_semantic_and_instances(
        masks=torch.zeros((0, 2, 2), dtype=torch.bool), scores=torch.zeros(0),
        labels=torch.zeros(0, dtype=torch.int64), semantic=semantic, stuff_area_limit=0)
    # the things class (0) stays void without instances
    assert torch.equal(pan, torch.tensor([[0, 1], [2, 2]], dtype=torch.int32))
    assert [(s["category_id"], s["area"]) for s in segs] == [(1, 1), (2, 2)]
