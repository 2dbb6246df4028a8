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


@pytest.mark.parametrize("config, build", [
    ("retinanet_resnet50_fpn.yaml", "retinanet_resnet50_fpn"),
    ("maskrcnn_resnet50_fpn.yaml", "maskrcnn_resnet50_fpn"),
])
def test_convert_tool_takes_every_family(tmp_path, config, build, capsys):
    """The tool builds the config's family and converts with its reader (every key used):
    RetinaNet and Mask R-CNN, not only Faster R-CNN."""
    import runpy

    import torchvision.models.detection as tvd

    torch.manual_seed(0)
    ref = getattr(tvd, build)(weights=None, weights_backbone=None).eval()
    src, dst = tmp_path / "tv.pth", tmp_path / "ours.pth"
    torch.save(ref.state_dict(), src)
    tool = runpy.run_path(str(ROOT / "tools" / "convert_weights.py"))
    assert tool["main"](["--config", str(ROOT / "configs" / "torchvision" / config),
                         "--weights", str(src), "--output", str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    ckpt = torch.load(dst, weights_only=True)
    from segmentation.config import load_config  # the full tree (Mask R-CNN's keys)

    model = load_model(load_config(ROOT / "configs" / "torchvision" / config), str(dst),
                       optimize=False)
    assert type(model).__name__ == {"retinanet_resnet50_fpn": "RetinaNet",
                                    "maskrcnn_resnet50_fpn": "MaskRCNN"}[build]
    # the converted tensors are torchvision's (the class logits drop the background)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    want = ref.state_dict()["backbone.body.layer1.0.conv1.weight"]
    assert torch.equal(ckpt["model"]["backbone.bottom_up.res2.0.conv1.weight"], want)
    # a checkpoint of another family is refused, naming what did not fit
    torch.save(tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(),
               src)
    with pytest.raises(Exception, match="roi_heads|head|key"):
        tool["main"](["--config", str(ROOT / "configs" / "torchvision" / config),
                      "--weights", str(src), "--output", str(tmp_path / "bad.pth")])
    assert not (tmp_path / "bad.pth").exists()
