"""The optimized inference path (folded norms, channels_last, fused ReLU/add) gives the
detections of the plain model, in float32."""

import copy
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from detection.config import load_config
from detection.modeling.build import build_model
from detection.modeling.calibration import calibrate_batchnorm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_fused_inference_keeps_detections():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "torchvision" / "fasterrcnn_resnet50_fpn.yaml",
                      ["MODEL.RESNETS.DEPTH", "18", "INPUT.MIN_SIZE_TEST", "160",
                       "INPUT.MAX_SIZE_TEST", "224", "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
                       "0.0", "MODEL.BACKBONE.WEIGHTS", ""])
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 150, 200), generator=gen).float(),
              torch.randint(0, 256, (3, 180, 140), generator=gen).float()]
    with torch.no_grad():
        calibrate_batchnorm(model, lambda: model(images))
        plain = copy.deepcopy(model).optimize_for_inference(channels_last=False, fuse=False)
        fast = model.optimize_for_inference(channels_last=True, fuse=True)
        assert any(type(m).__name__ == "FusedLinear" for m in fast.modules())
        want, got = plain(images), fast(images)
    for w, g in zip(want, got):
        assert len(w["boxes"]) >= 20 and torch.isfinite(w["scores"]).all()
        top = w["scores"].argsort(descending=True)[:20]
        # every confident reference detection is found again: same box, label and score
        iou = box_iou(w["boxes"][top], g["boxes"])
        same_label = w["labels"][top, None] == g["labels"][None]
        best = (iou * same_label).max(dim=1)
        assert (best.values > 0.999).all()
        torch.testing.assert_close(g["scores"][best.indices], w["scores"][top], rtol=1e-3,
                                   atol=1e-4)
