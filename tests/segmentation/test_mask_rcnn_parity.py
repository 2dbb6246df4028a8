"""Parity with torchvision's Mask R-CNN (v1 and v2) on converted random weights with calibrated
normalization statistics: same boxes, scores, labels and pasted mask probabilities."""

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

import segmentation  # noqa: F401  (MODEL.MASK_ON, ROI_MASK_HEAD.*)
from detection.modeling.calibration import calibrate_batchnorm, textured_image
from detection.modeling.convert import load_state_dict
from segmentation.config import load_config
from segmentation.mask_rcnn import MaskRCNN, build_mask_rcnn, torchvision_to_ours

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MIN_SIZE, MAX_SIZE = 288, 400
POST_NMS = 200  # proposals per image: keeps the float64 heads cheap
DETECTIONS = 60


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, far faster than contended threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images():
    gen = torch.Generator().manual_seed(0)
    return [textured_image(h, w, noise=0.15, generator=gen) for h, w in ((240, 320), (300, 220))]


def _our_model(config: str) -> MaskRCNN:
    cfg = load_config(CONFIGS / "torchvision" / config)
    cfg.MODEL.BACKBONE.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.02
    cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE = DETECTIONS
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = POST_NMS
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = MIN_SIZE, MAX_SIZE
    model = build_mask_rcnn(cfg).eval()
    assert model.paste_mode == "torchvision"
    return model


def _reference(builder):
    torch.manual_seed(0)
    ref = builder(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE,
                  box_score_thresh=0.02, box_detections_per_img=DETECTIONS,
                  rpn_post_nms_top_n_test=POST_NMS).eval()
    with torch.no_grad():  # livelier heads than the default init: spread-out scores and masks
        torch.nn.init.normal_(ref.rpn.head.cls_logits.weight, std=0.3)
        torch.nn.init.normal_(ref.roi_heads.box_predictor.cls_score.weight, std=0.05)
        torch.nn.init.normal_(ref.roi_heads.box_predictor.bbox_pred.weight, std=0.01)
        torch.nn.init.normal_(ref.roi_heads.mask_predictor.mask_fcn_logits.weight, std=0.05)
    imgs = [i / 255 for i in _images()]
    calibrate_batchnorm(ref, lambda: ref(imgs))
    return ref.double()


def _check_parity(ref, ours: MaskRCNN) -> None:
    ours = ours.double()
    imgs = _images()
    with torch.no_grad():
        expected = ref([i.double() / 255 for i in imgs])
        got = ours([i.double() for i in imgs])
    for e, g, img in zip(expected, got, imgs):
        n = e["boxes"].shape[0]
        assert n == DETECTIONS, "the reference must return many detections"
        for k in ("boxes", "scores", "masks"):
            assert torch.isfinite(e[k]).all()
        assert e["masks"].shape == (n, 1, *img.shape[-2:]) == g["masks"].shape
        assert torch.equal(e["labels"], g["labels"] + 1)  # ours: 0..89, torchvision: 1..90
        box_diff = (e["boxes"] - g["boxes"]).abs().max().item()
        score_diff = (e["scores"] - g["scores"]).abs().max().item()
        mask_diff = (e["masks"] - g["masks"]).abs().max().item()
        spread = e["masks"].amax().item() - e["masks"][e["masks"] > 0].amin().item()
        print(f"{n} detections: max |diff| boxes {box_diff:.2e}, scores {score_diff:.2e}, "
              f"masks {mask_diff:.2e} (probabilities spread over {spread:.2f})")
        assert box_diff < 1e-3 and score_diff < 1e-4 and mask_diff < 1e-4
        assert spread > 0.2, "mask probabilities should vary"
        assert torch.equal(g["binary_masks"], g["masks"][:, 0] >= 0.5)


@pytest.mark.slow
def test_torchvision_maskrcnn_v1_parity(one_thread):
    ref = _reference(maskrcnn_resnet50_fpn)
    ours = _our_model("maskrcnn_resnet50_fpn.yaml")
    load_state_dict(ours, torchvision_to_ours(ref.state_dict()))
    _check_parity(ref, ours)


@pytest.mark.slow
def test_torchvision_maskrcnn_v2_parity(one_thread):
    ref = _reference(maskrcnn_resnet50_fpn_v2)
    ours = _our_model("maskrcnn_resnet50_fpn_v2.yaml")
    load_state_dict(ours, torchvision_to_ours(ref.state_dict()))
    _check_parity(ref, ours)


def test_published_v1_mask_names_convert_like_todays():
    sd = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict()
    old = {}
    for k, v in sd.items():
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        old[k] = v
    assert "roi_heads.mask_head.mask_fcn4.weight" in old
    a, b = torchvision_to_ours(sd), torchvision_to_ours(old)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logits = sd["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(a["roi_heads.mask_head.predictor.weight"], logits[1:])
