"""load_model / predict and the weight-conversion tool, on a tiny torchvision-format model."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fvcore.common.config import CfgNode
from PIL import Image
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from detection.modeling.predictor import load_model, predict

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "torchvision" / "fasterrcnn_resnet50_fpn.yaml"


@pytest.mark.starts_processes
def test_convert_tool_and_predict(tmp_path):
    torch.manual_seed(0)
    ref = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    src = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), src)
    dst = tmp_path / "ours.pth"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_weights.py"), "--config",
                    str(CONFIG), "--weights", str(src), "--output", str(dst)], check=True,
                   cwd=ROOT)
    ckpt = torch.load(dst, weights_only=True)
    assert set(ckpt) == {"model", "config", "metadata"}
    assert ckpt["metadata"]["category_ids"][:3] == [1, 2, 3]
    cfg = CfgNode.load_cfg(ckpt["config"])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 90

    model = load_model(CONFIG, str(dst))
    model.preprocessor.min_size_test, model.preprocessor.max_size_test = 96, 128
    model.roi_heads.score_thresh = 0.0
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    results = [predict(model, x) for x in (array, Image.fromarray(array), str(path),
                                           torch.from_numpy(array).permute(2, 0, 1))]
    for r in results:
        assert torch.allclose(r["boxes"], results[0]["boxes"])
        assert r["boxes"].shape[0] == len(r["class_names"]) == len(r["category_ids"])
        assert r["boxes"].shape[0] > 0
        assert r["boxes"][:, 2].max() <= 120 and r["boxes"][:, 3].max() <= 80
    gray = predict(model, array[:, :, 0])
    assert gray["boxes"].shape[1] == 4
