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
from detection.optimize import optimize_for_inference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("f6_min_pixels", [None, 500])
def test_fused_inference_keeps_detections(monkeypatch, f6_min_pixels):
    """With ``f6_min_pixels`` lowered, the large maps of these small images (FPN's P2 and P3
    outputs and the RPN head's conv on them) run as Winograd F(6x6, 3x3), as an 800x1067
    image's P2 does."""
    import backbones.fused as fused_module

    if f6_min_pixels:
        monkeypatch.setattr(fused_module, "F6_MIN_PIXELS", f6_min_pixels)
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
        plain = optimize_for_inference(copy.deepcopy(model), channels_last=False,
                                       fuse=False)
        fast = optimize_for_inference(model, channels_last=True, fuse=True)
        assert any(type(m).__name__ == "FusedLinear" for m in fast.modules())
        # the FPN output convs and the RPN head's conv run as Winograd convolutions
        assert sum(getattr(m, "weight_winograd", None) is not None
                   for m in fast.modules()) >= 5
        want, got = plain(images), fast(images)
        made = sum(getattr(m, "weight_winograd6", None) is not None for m in fast.modules())
        assert made == (3 if f6_min_pixels else 0)  # P2, P3 output convs; the RPN conv
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


@pytest.mark.parametrize("conv_dims", [(), (8,)])
def test_box_head_flattens_channels_last_features_in_place(conv_dims):
    """After ``use_channels_last`` the box head computes the same function, on channels-last
    RoI features (the CPU RoIAlign's layout, flattened as a view) and on NCHW ones."""
    from detection.modeling.roi_heads import FastRCNNConvFCHead

    torch.manual_seed(0)
    head = FastRCNNConvFCHead(in_channels=6, resolution=5, conv_dims=conv_dims,
                              fc_dims=(16, 12)).eval()
    x = torch.randn(7, 6, 5, 5)
    before = head.fcs[0].weight.detach().clone()
    with torch.no_grad():
        want = head(x)
        head.use_channels_last()
        head.use_channels_last()  # idempotent
        got_cl = head(x.contiguous(memory_format=torch.channels_last))
        got = head(x)
    torch.testing.assert_close(got_cl, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert head.flatten_channels_last and not torch.equal(head.fcs[0].weight, before)
