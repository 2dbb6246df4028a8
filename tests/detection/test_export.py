"""Export to ONNX, TorchScript and OpenVINO: each runtime reproduces the eager detector's
detections (boxes within 1e-2 px, scores within 1e-4, same labels, masks within 1e-3) on
images of sizes other than the traced one, returns empty outputs of the right shapes, converts
grayscale and RGBA input as eager does, and fails clearly where it cannot run."""

import builtins

import numpy as np
import pytest
import torch

import backbones
from detection.deploy import UnsupportedExportError, check_export, export_model, load_exported
from detection.deploy.agreement import compare_detections
from detection.deploy.export import sample_image
from detection.engine.loading import build_model_from_cfg
from detection.modeling.calibration import calibrate_batchnorm
from detection.modeling.predictor import load_model, predict
from detection.optimize import optimize_for_inference
from segmentation.config import load_config  # Mask R-CNN's keys too

# Sizes other than the traced 480x640, one of them an extreme aspect ratio.
SIZES = [(203, 157), (150, 271), (64, 400)]
SMALL = ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "400",
         "MODEL.RPN.PRE_NMS_TOPK_TEST", "300", "MODEL.RPN.POST_NMS_TOPK_TEST", "100"]
CONFIGS = {
    "fpn": ("faster_rcnn_r18_fpn_shapes.yaml", ["MODEL.FPN.OUT_CHANNELS", "64",
                                                 "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
                                                 "MODEL.ROI_HEADS.MIN_BOX_SIZE", "0.01"]),
    "mask": ("mask_rcnn_r18_fpn_shapes.yaml", ["MODEL.FPN.OUT_CHANNELS", "64"]),
    "c4": ("faster_rcnn_r50_c4.yaml", ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.NORM", "BN",
                                       "MODEL.RESNETS.STRIDE_IN_1X1", "False",
                                       "MODEL.BACKBONE.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT",
                                       "0", "MODEL.ROI_HEADS.NUM_CLASSES", "4",
                                       "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
                                       "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]",
                                       "MODEL.INPUT_FORMAT", "RGB"]),
}


def lively_model(name: str, extra=()):
    """A small random detector with calibrated BatchNorm statistics and class logits lively
    enough that many detections pass the 0.05 score threshold."""
    config, opts = CONFIGS[name]
    cfg = load_config(config, [*SMALL, *opts, *extra])
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg).eval()
    image = sample_image(240, 320, seed=7)
    with torch.no_grad():
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
        calibrate_batchnorm(model, lambda: model([image]))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    """(name, eager model, {runtime: deployed model}) for each config: an ONNX export run in
    onnxruntime and in OpenVINO (whole, and as its preprocess, backbone and heads graphs), and a
    TorchScript export."""
    model = lively_model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    export_model(model, root / "onnx", "onnx", split=True)
    export_model(model, root / "ts", "torchscript")
    runtimes = {"onnxruntime": load_exported(root / "onnx"),
                "openvino": load_exported(root / "onnx", "openvino", split=False),
                "openvino-split": load_exported(root / "onnx", "openvino", split=True),
                "torchscript": load_exported(root / "ts")}
    assert runtimes["openvino-split"].arrangement == "split: backbone f32, preprocess and heads f32"
    return request.param, model, runtimes


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "openvino-split", "torchscript"])
def test_runtime_parity(exported, runtime):
    name, model, runtimes = exported
    deployed = runtimes[runtime]
    for h, w in SIZES:
        image = sample_image(h, w, seed=h)
        with torch.no_grad():
            expected = model([image])[0]
        got = deployed([image])[0]
        assert expected["boxes"].shape[0] >= 20, "the reference must detect something"
        assert torch.isfinite(expected["boxes"]).all() and torch.isfinite(got["boxes"]).all()
        assert got["labels"].dtype == torch.int64
        agreement = compare_detections(expected, got, iou=0.999, score_tol=1e-4)
        assert agreement.fraction == 1.0, f"{name}, {runtime}, {h}x{w}: {agreement}"
        assert agreement.max_box_diff < 1e-2, f"{name}, {runtime}, {h}x{w}: {agreement}"
        assert got["boxes"].shape == expected["boxes"].shape
        if name == "mask":
            assert got["masks"].shape[1:] == (1, h, w)
            assert agreement.max_mask_diff < 1e-3, f"{runtime}, {h}x{w}: {agreement}"
            assert got["binary_masks"].dtype == torch.bool


def test_predict_converts_grayscale_and_rgba(exported):
    name, model, runtimes = exported
    if name != "fpn":
        pytest.skip("one model is enough")
    rgb = sample_image(150, 200, seed=3).permute(1, 2, 0).to(torch.uint8).numpy()
    gray = rgb.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full_like(rgb[:, :, :1], 255)], axis=2)
    for array in (gray, rgba):
        expected = predict(model, array)
        got = predict(runtimes["onnxruntime"], array)
        assert expected["boxes"].shape[0] > 0
        assert compare_detections(expected, got, iou=0.999, score_tol=1e-4).fraction == 1.0
        assert got["class_names"] == expected["class_names"]


def test_no_detections_gives_empty_outputs(tmp_path):
    """Background logits far above the others: nothing passes the score threshold."""
    model = lively_model("mask")
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[-1] = 100.0
    export_model(model, tmp_path / "onnx", "onnx", split=True)
    export_model(model, tmp_path / "ts", "torchscript")
    image = sample_image(120, 90, seed=1)
    with torch.no_grad():
        assert model([image])[0]["boxes"].shape == (0, 4)
    for deployed in (load_exported(tmp_path / "onnx"), load_exported(tmp_path / "onnx", "openvino"),
                     # bf16's split graphs where the CPU has native bf16
                     load_exported(tmp_path / "onnx", "openvino", precision="auto"),
                     load_exported(tmp_path / "ts")):
        out = deployed([image])[0]
        assert out["boxes"].shape == (0, 4), deployed
        assert out["scores"].shape == (0,) and out["labels"].shape == (0,)
        assert out["masks"].shape == (0, 1, 120, 90) and out["binary_masks"].shape == (0, 120, 90)


def test_openvino_ir_and_export_check(tmp_path):
    model = lively_model("fpn")
    info = export_model(model, tmp_path, "openvino")
    assert (tmp_path / "model.xml").is_file() and (tmp_path / "model.bin").is_file()
    assert info.parts["features"] == ["p2", "p3", "p4", "p5", "p6"]
    for part in ("preprocess", "backbone", "heads"):
        assert (tmp_path / info.parts[part]).with_suffix(".bin").is_file()
    # weights stay float32 in the IR (~4 bytes per parameter)
    params = sum(p.numel() for p in model.parameters())
    assert (tmp_path / "model.bin").stat().st_size > 3.5 * params
    check = check_export(model, tmp_path, sizes=((480, 640), (211, 333)))
    assert check["runtime"] == "openvino" and check["fraction"] == 1.0, check
    assert info.class_names == model.metadata.class_names


def test_deformable_conv_is_refused_by_onnx(tmp_path):
    model = lively_model("fpn")
    model.backbone.bottom_up = backbones.build_backbone(
        "resnet50", deform_stages=["res5"], out_features=["res2", "res3", "res4", "res5"])
    with pytest.raises(UnsupportedExportError, match=r"backbone\.bottom_up\.res5\.0\.conv2.*"
                                                      "deformable"):
        export_model(model, tmp_path, "onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_fused_model_is_refused(tmp_path):
    model = optimize_for_inference(lively_model("fpn"))
    with pytest.raises(UnsupportedExportError, match="plain model"):
        export_model(model, tmp_path, "onnx")


@pytest.mark.parametrize("package", ["onnxruntime", "openvino"])
def test_missing_runtime_names_the_package(monkeypatch, package):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(__import__("sys").modules, package, raising=False)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        load_model("faster_rcnn_r18_fpn_shapes.yaml", runtime=package)


def test_load_model_runtime_exports_once(tmp_path, monkeypatch):
    """load_model(..., runtime=...) exports into the cache once and reuses it."""
    monkeypatch.setenv("DETKIT_CACHE", str(tmp_path))
    model = lively_model("fpn")
    weights = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, weights)
    cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", [*SMALL, *CONFIGS["fpn"][1]])
    ort_model = load_model(cfg, str(weights), runtime="onnxruntime")
    folders = list((tmp_path / "exported").iterdir())
    assert len(folders) == 1
    mtime = (folders[0] / "model.onnx").stat().st_mtime_ns
    ov_model = load_model(cfg, str(weights), runtime="openvino", precision="fp32")
    assert (folders[0] / "model.onnx").stat().st_mtime_ns == mtime  # not exported again
    image = sample_image(170, 230, seed=5)
    with torch.no_grad():
        expected = model([image])[0]
    for deployed in (ort_model, ov_model):
        agreement = compare_detections(expected, deployed([image])[0], iou=0.999, score_tol=1e-4)
        assert agreement.reference > 0 and agreement.fraction == 1.0, agreement
