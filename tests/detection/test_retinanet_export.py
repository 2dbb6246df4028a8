"""RetinaNet exported to ONNX (run in ONNX Runtime), TorchScript and OpenVINO IR (float32)
reproduces the eager model's detections (same labels, IoU > 0.999, scores within 1e-4) on
image sizes other than the traced one, and returns empty outputs of the right shapes when
nothing passes the score threshold."""

import pytest
import torch

from detection.config import load_config
from detection.deploy import export_model, load_exported
from detection.deploy.agreement import compare_detections
from detection.deploy.export import sample_image
from detection.modeling.build import build_retinanet
from detection.modeling.calibration import calibrate_batchnorm

pytest.importorskip("onnxruntime")

SIZES = [(203, 157), (150, 271), (64, 400)]  # none is the traced 480x640


@pytest.fixture(scope="module")
def model():
    """A small random RetinaNet with calibrated BatchNorm statistics and class logits lively
    enough that many detections pass 0.05."""
    cfg = load_config("retinanet_r18_fpn_shapes.yaml", [
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.RETINANET.NUM_CONVS", "2",
        "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "400"])
    torch.manual_seed(0)
    m = build_retinanet(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.head.cls_score.weight, std=0.05)
        m.head.cls_score.bias.fill_(-3.0)
        calibrate_batchnorm(m, lambda: m([sample_image(240, 320, seed=7)]))
    return m


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "openvino"])
def test_runtime_parity(model, tmp_path, fmt):
    """ONNX in ONNX Runtime, TorchScript, and OpenVINO IR in OpenVINO float32."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    info = export_model(model, tmp_path / fmt, fmt)
    assert info.outputs == ["boxes", "scores", "labels"]
    assert len(info.class_names) == 4
    deployed = load_exported(tmp_path / fmt)
    for h, w in SIZES:
        image = sample_image(h, w, seed=h)
        with torch.no_grad():
            expected = model([image])[0]
        got = deployed([image])[0]
        assert expected["boxes"].shape[0] >= 20, "the reference must detect something"
        assert torch.isfinite(got["boxes"]).all() and got["labels"].dtype == torch.int64
        agreement = compare_detections(expected, got, iou=0.999, score_tol=1e-4)
        print(f"{h}x{w}: {agreement}")
        assert agreement.fraction == 1.0, f"{h}x{w}: {agreement}"
        assert got["boxes"].shape == expected["boxes"].shape
        assert (got["boxes"][:, 2] <= w).all() and (got["boxes"][:, 3] <= h).all()


def test_no_detections_gives_empty_outputs(model, tmp_path):
    with torch.no_grad():
        bias = model.head.cls_score.bias.clone()
        model.head.cls_score.bias.fill_(-100.0)
        try:
            export_model(model, tmp_path / "onnx", "onnx")
            image = sample_image(120, 90, seed=1)
            assert model([image])[0]["boxes"].shape == (0, 4)
        finally:
            model.head.cls_score.bias.copy_(bias)
    got = load_exported(tmp_path / "onnx")([image])[0]
    assert got["boxes"].shape == (0, 4) and got["scores"].shape == (0,)
