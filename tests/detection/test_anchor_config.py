"""``MODEL.ANCHOR_GENERATOR.SIZES`` read as detectron2 reads it (its ``_broadcast_params``): a
single list goes whole to every feature map, otherwise one list per feature map."""

import pytest
import torch

from detection.config import load_config
from detection.modeling.build import build_anchor_generator

STRIDES = [4, 8, 16, 32, 64]


def detectron2_rule(sizes, num_features):
    """detectron2's broadcast: a list of one entry is repeated for every feature map."""
    if len(sizes) == 1:
        return [list(sizes[0])] * num_features
    if len(sizes) != num_features:
        raise ValueError("one entry per feature map")
    return [list(s) for s in sizes]


def generator(sizes):
    cfg = load_config("faster_rcnn_r50_fpn.yaml",
                      ["MODEL.ANCHOR_GENERATOR.SIZES", str(sizes)])
    return build_anchor_generator(cfg, STRIDES)


@pytest.mark.parametrize("sizes", [
    [[16, 32, 64, 128, 256]],             # one list of five: every level takes all five
    [[32, 64]],
    [[32], [64], [128], [256], [512]],    # one list per level
    [[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]],
])
def test_sizes_follow_detectron2s_rule(sizes):
    want = detectron2_rule(sizes, len(STRIDES))
    gen = generator(sizes)
    assert gen.num_anchors == [3 * len(s) for s in want]  # three aspect ratios
    for level, level_sizes in enumerate(want):
        cell = getattr(gen, f"cell_anchors_{level}")
        sides = torch.sqrt((cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1]))
        got = sorted({round(float(s)) for s in sides})
        assert got == sorted({round(float(s)) for s in level_sizes}), (level, got)


def test_a_wrong_number_of_levels_is_an_error():
    with pytest.raises(ValueError, match="2 levels of sizes for 5 feature maps"):
        generator([[32], [64]])
