"""``detection.optimize.optimize_for_inference`` on every family: the optimized model gives the
plain model's outputs in float32, and under precision "bf16" each family's declared split
puts exactly the declared parts in bf16."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

import segmentation  # noqa: F401  (registers the segmentation families)
from backbones.fused import FusedConv2d, FusedLinear
from backbones.machine import parse_cpuinfo, simulate_cpu
from detection.families import get_family
from detection.modeling.calibration import calibrate_batchnorm
from detection.modeling.precision import Cast, RefinedRPNHead
from detection.optimize import optimize_for_inference, supports_bf16
from segmentation.config import load_config

CPUINFO = Path(__file__).resolve().parents[1] / "backbones" / "data"
AMX_CPU = parse_cpuinfo((CPUINFO / "cpuinfo_intel_xeon_sapphire_rapids_amx.txt").read_text())

SMALL = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.BACKBONE.WEIGHTS", ""]
RCNN = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "25"]
FAMILIES = {
    "faster_fpn": ("faster_rcnn_r18_fpn_shapes.yaml", RCNN),
    "faster_c4": ("faster_rcnn_r50_c4.yaml",
                  ["MODEL.RESNETS.DEPTH", "18",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.ROI_HEADS.NUM_CLASSES",
                   "3", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
                   "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]),
    "mask": ("mask_rcnn_r18_fpn_shapes.yaml", [*RCNN, "MODEL.ROI_MASK_HEAD.CONV_DIM", "16"]),
    "retinanet": ("retinanet_r18_fpn_shapes.yaml",
                  ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.FPN.OUT_CHANNELS", "32"]),
    "panoptic": ("panoptic_fpn_r18_shapes.yaml",
                 [*RCNN, "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM",
                  "32", "MODEL.PANOPTIC_FPN.COMBINE.ENABLED", "False"]),
    "semantic": ("semantic_fpn_r18_shapes.yaml",
                 ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32"]),
    "cascade": ("faster_rcnn_r18_fpn_shapes.yaml",
                [*RCNN, "MODEL.ROI_HEADS.NAME", "CascadeROIHeads"]),
    "keypoint": ("faster_rcnn_r18_fpn_shapes.yaml",
                 [*RCNN, "MODEL.KEYPOINT_ON", "True", "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS",
                  "(16, 16)", "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "5"]),
}


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _images():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 90, 120), generator=gen).float(),
            torch.randint(0, 256, (3, 110, 84), generator=gen).float()]


def _model(name, calibrate=True):
    config, opts = FAMILIES[name]
    cfg = load_config(config, [*SMALL, *opts])
    torch.manual_seed(0)
    model = get_family(cfg).build(cfg).eval()
    images = _images()
    if calibrate:
        with torch.no_grad():  # BatchNorm statistics that folding must carry over
            calibrate_batchnorm(model, lambda: model(images))
    return model


def _assert_same_detections(want, got):
    assert len(want["boxes"]) >= 10 and torch.isfinite(want["scores"]).all()
    top = want["scores"].argsort(descending=True)[:10]
    iou = box_iou(want["boxes"][top], got["boxes"])
    same_label = want["labels"][top, None] == got["labels"][None]
    best = (iou * same_label).max(dim=1)
    assert (best.values > 0.999).all(), best.values
    torch.testing.assert_close(got["scores"][best.indices], want["scores"][top], rtol=1e-3,
                               atol=1e-4)
    if "masks" in want:
        torch.testing.assert_close(got["masks"][best.indices], want["masks"][top], atol=1e-3,
                                   rtol=0)
    if "keypoints" in want:
        torch.testing.assert_close(got["keypoints_scores"][best.indices],
                                   want["keypoints_scores"][top], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got["keypoints"][best.indices], want["keypoints"][top],
                                   atol=1e-2, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_optimized_model_keeps_the_plain_models_outputs(name):
    model = _model(name)
    images = _images()
    with torch.no_grad():
        want = model(images)
        fast = optimize_for_inference(copy.deepcopy(model))
        got = fast(images)
    assert fast.precision == "fp32" and fast.input_channels_last
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    if torch.backends.mkldnn.is_available():  # ReLUs inside the convs and linears
        assert any(isinstance(m, FusedConv2d) and m.fused_relu for m in fast.modules())
    if name.startswith("faster"):
        assert any(isinstance(m, FusedLinear) for m in fast.modules()) == (name == "faster_fpn")
    for w, g in zip(want, got):
        if "sem_seg" in w:
            torch.testing.assert_close(g["sem_seg"], w["sem_seg"], rtol=1e-3, atol=1e-3)
        if "boxes" in w:
            _assert_same_detections(w, g)


# The parts in bf16 under each family's declared split (parameters' dtype).
BF16_PARTS = {
    "faster_fpn": ["backbone"],
    "retinanet": ["backbone"],
    "mask": ["backbone", "roi_heads.mask_head.convs", "roi_heads.mask_head.deconv"],
    "panoptic": ["backbone", "roi_heads.mask_head.convs", "roi_heads.mask_head.deconv"],
    "semantic": ["backbone"],
    "cascade": ["backbone"],
    "keypoint": ["backbone"],  # the keypoint head in float32, as the box head
}


@pytest.mark.parametrize("name", list(BF16_PARTS))
def test_bf16_split_puts_the_declared_parts_in_bf16(name):
    model = _model(name, calibrate=False)
    assert supports_bf16(model)
    with simulate_cpu(AMX_CPU):
        model = optimize_for_inference(model, precision="bf16")
    assert model.precision == "bf16" and model.input_dtype == torch.bfloat16
    in_bf16 = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    declared = BF16_PARTS[name]
    for n in dict(model.named_parameters()):
        inside = any(n.startswith(part + ".") for part in declared) \
            or ".low." in n  # the refined RPN head's bf16 copy
        assert (n in in_bf16) == inside, n
    if hasattr(model, "rpn"):
        assert isinstance(model.rpn.head, RefinedRPNHead)
    for head in ("head", "sem_seg_head"):
        if head in BF16_PARTS[name] or not hasattr(model, head):
            continue
        assert isinstance(getattr(model, head), Cast)
        assert getattr(model, head).input_dtype == torch.float32


def test_a_model_without_a_bf16_split_refuses_bf16():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    with simulate_cpu(AMX_CPU), pytest.raises(ValueError, match="Plain declares no bf16_split"):
        optimize_for_inference(Plain(), precision="bf16")
