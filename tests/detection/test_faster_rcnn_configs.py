"""Every Faster R-CNN config loads through the config system and describes the model it
names; the defaults come from add_model_config."""

from pathlib import Path

import pytest
from fvcore.common.config import CfgNode

from detection.modeling.defaults import add_model_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted([*CONFIGS.glob("faster_rcnn_r50_*.yaml"), *CONFIGS.glob("faster_rcnn_r101_*.yaml"),
                *CONFIGS.glob("detectron2/faster_rcnn_*.yaml"),
                *CONFIGS.glob("torchvision/fasterrcnn_*.yaml")])


def test_defaults_without_config_module():
    cfg = add_model_config(CfgNode())
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert cfg.INPUT.MIN_SIZE_TEST == 800 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path):
    get_cfg = pytest.importorskip("detection.config").get_cfg
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    name = path.stem.lower()
    depth = 101 if "101" in name else 50
    assert cfg.MODEL.RESNETS.DEPTH == depth
    fpn = "fpn" in name
    assert cfg.MODEL.BACKBONE.NAME == ("resnet_fpn" if fpn else "resnet")
    assert cfg.MODEL.ROI_HEADS.NAME == ("StandardROIHeads" if fpn else "Res5ROIHeads")
    if "torchvision" not in str(path):
        three_x = "3x" in name
        assert cfg.SOLVER.MAX_ITER == (270000 if three_x else 90000)
        assert tuple(cfg.SOLVER.STEPS) == ((210000, 250000) if three_x else (60000, 80000))
        assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.02
        assert cfg.MODEL.BACKBONE.WEIGHTS == f"detectron2/R-{depth}"
