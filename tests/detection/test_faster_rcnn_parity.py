"""Parity with torchvision's Faster R-CNN (v1 and v2) on converted random weights with
calibrated normalization statistics: same proposals, boxes, scores and labels."""

from pathlib import Path

import pytest
import torch
from fvcore.common.config import CfgNode
from torchvision.models.detection import fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2

from detection.modeling.build import build_model
from detection.modeling.calibration import calibrate_batchnorm, textured_image
from detection.modeling.convert import load_state_dict, torchvision_to_ours
from detection.modeling.defaults import add_model_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MIN_SIZE, MAX_SIZE = 288, 480
POST_NMS = 300  # proposals per image (1000 by default): keeps the float64 heads cheap


def _images():
    gen = torch.Generator().manual_seed(0)
    return [textured_image(h, w, noise=0.15, generator=gen) for h, w in ((240, 320), (300, 220))]


def _our_model(config: str):
    cfg = CfgNode()
    add_model_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "torchvision" / config))
    cfg.MODEL.BACKBONE.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.02
    cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = POST_NMS
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = MIN_SIZE, MAX_SIZE
    return build_model(cfg).eval()


def _reference(builder):
    torch.manual_seed(0)
    ref = builder(
        weights=None,
        weights_backbone=None,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        box_score_thresh=0.02,
        box_detections_per_img=200,
        rpn_post_nms_top_n_test=POST_NMS,
    ).eval()
    with torch.no_grad():  # livelier heads than the default init: spread-out scores
        torch.nn.init.normal_(ref.rpn.head.cls_logits.weight, std=0.3)
        torch.nn.init.normal_(ref.roi_heads.box_predictor.cls_score.weight, std=0.05)
        torch.nn.init.normal_(ref.roi_heads.box_predictor.bbox_pred.weight, std=0.01)
    imgs = [i / 255 for i in _images()]
    calibrate_batchnorm(ref, lambda: ref(imgs))
    return ref.double()


def _check_parity(ref, ours):
    ours = ours.double()
    imgs = _images()
    captured = {}
    hooks = [
        m.rpn.register_forward_hook(lambda mod, i, out, name=name: captured.update({name: out[0]}))
        for name, m in (("ref", ref), ("ours", ours))
    ]
    with torch.no_grad():
        expected = ref([i.double() / 255 for i in imgs])
        got = ours([i.double() for i in imgs])
    for h in hooks:
        h.remove()
    ref_props, our_props = captured["ref"], captured["ours"]
    for rp, op in zip(ref_props, our_props):
        assert rp.shape[0] == POST_NMS and rp.shape == op.shape
        assert torch.isfinite(rp).all()
        assert (rp - op).abs().max() < 1e-6
        print(f"proposals {rp.shape[0]}: max |diff| {(rp - op).abs().max().item():.2e}")
    for e, g in zip(expected, got):
        assert e["boxes"].shape[0] >= 100, "the reference must return many detections"
        assert torch.isfinite(e["boxes"]).all() and torch.isfinite(e["scores"]).all()
        assert e["boxes"].shape == g["boxes"].shape
        assert torch.equal(e["labels"], g["labels"] + 1)  # ours: 0..89, torchvision: 1..90
        assert (e["boxes"] - g["boxes"]).abs().max() < 1e-3
        assert (e["scores"] - g["scores"]).abs().max() < 1e-4
        print(
            f"detections {e['boxes'].shape[0]}: max |box diff| "
            f"{(e['boxes'] - g['boxes']).abs().max().item():.2e}, max |score diff| "
            f"{(e['scores'] - g['scores']).abs().max().item():.2e}"
        )


@pytest.mark.slow
def test_torchvision_v1_parity():
    ref = _reference(fasterrcnn_resnet50_fpn)
    ours = _our_model("fasterrcnn_resnet50_fpn.yaml")
    load_state_dict(ours, torchvision_to_ours(ref.state_dict()))
    _check_parity(ref, ours)


@pytest.mark.slow
def test_torchvision_v2_parity():
    ref = _reference(fasterrcnn_resnet50_fpn_v2)
    ours = _our_model("fasterrcnn_resnet50_fpn_v2.yaml")
    load_state_dict(ours, torchvision_to_ours(ref.state_dict()))
    _check_parity(ref, ours)


def test_torchvision_published_names_convert_like_todays():
    ref = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    today = ref.state_dict()
    published = {}
    for k, v in today.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for kind in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k = k.replace(f"fpn.{kind}.{i}.0.", f"fpn.{kind}.{i}.")
        published[k] = v
    assert "rpn.head.conv.weight" in published
    assert "backbone.fpn.inner_blocks.0.weight" in published
    a, b = torchvision_to_ours(today), torchvision_to_ours(published)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["roi_heads.box_predictor.cls_score.weight"].shape[0] == 91
    assert a["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 90 * 4
    assert torch.equal(
        a["roi_heads.box_predictor.cls_score.weight"][-1],
        today["roi_heads.box_predictor.cls_score.weight"][0],
    )
