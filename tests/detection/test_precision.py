"""bf16 inference keeps a trained detector's detections: in torch at least 99% of float32's
detections come back with the same label, IoU > 0.95 and a score within 0.02 (detections
within that tolerance of the 0.05 threshold excepted), while the heads, boxes, scores and NMS
stay in float32. OpenVINO's bf16 keeps its graph tail in float32. On a CPU without native bf16
those tests skip, and bf16 is refused there with the toolkit's error (checked on simulated
CPUs from real /proc/cpuinfo files, so that every machine runs the refusal)."""

import copy
import logging
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from backbones import machine
from backbones.machine import PrecisionUnavailable, parse_cpuinfo, simulate_cpu
from detection.deploy import export_model, load_exported
from detection.deploy.agreement import compare_detections
from detection.engine.loading import build_model_from_cfg
from detection.modeling.precision import RefinedRPNHead, low_precision_parts
from detection.modeling.rpn import RPNHead
from detection.optimize import optimize_for_inference
from segmentation.config import load_config

SIZE = 160
REPO = Path(__file__).resolve().parents[2]
CPUINFO = REPO / "tests" / "backbones" / "data"
AVX2_CPU = parse_cpuinfo((CPUINFO / "cpuinfo_amd_epyc_zen3_avx2.txt").read_text())
AMX_CPU = parse_cpuinfo((CPUINFO / "cpuinfo_intel_xeon_sapphire_rapids_amx.txt").read_text())
needs_native_bf16 = pytest.mark.skipif(
    not machine.bf16_runs_natively("cpu"),
    reason="bf16 is not native on this CPU (needs avx512_bf16, amx_bf16 or avx_ne_convert): "
           + machine.describe())
COLORS = torch.tensor([[230.0, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]])


def shapes(n: int, seed: int):
    """Rectangles of 4 colours (the class) on noise."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, SIZE, SIZE, generator=gen) * 80 + 60
        boxes, labels = [], []
        for _ in range(3):
            w, h = torch.randint(20, 60, (2,), generator=gen).tolist()
            x, y = torch.randint(0, SIZE - 60, (2,), generator=gen).tolist()
            c = int(torch.randint(0, 4, (1,), generator=gen))
            img[:, y:y + h, x:x + w] = COLORS[c][:, None, None]
            boxes.append([x, y, x + w, y + h])
            labels.append(c)
        images.append(img.round())
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels)})
    return images, targets


@pytest.fixture(scope="module")
def trained():
    """The shapes config's R18-FPN, narrowed, trained briefly on rectangles."""
    cfg = load_config("mask_rcnn_r18_fpn_shapes.yaml", [
        "MODEL.MASK_ON", "False", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
        "INPUT.MIN_SIZE_TEST", str(SIZE), "INPUT.MAX_SIZE_TEST", str(SIZE)])
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg)
    images, targets = shapes(32, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = 240
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps,
                                                   pct_start=0.1)
    model.train()
    for it in range(steps):
        i = (it * 4) % len(images)
        loss = sum(model(images[i:i + 4], targets[i:i + 4]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


@needs_native_bf16
def test_bf16_keeps_detections_in_torch(trained):
    fp32 = optimize_for_inference(copy.deepcopy(trained), precision="fp32")
    bf16 = optimize_for_inference(copy.deepcopy(trained), precision="bf16")
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}
    assert low_precision_parts(bf16) == []  # Cast wrappers into bf16: none in Faster R-CNN
    assert {p.dtype for p in bf16.roi_heads.parameters()} == {torch.float32}
    assert bf16.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32
    head = bf16.rpn.head  # bf16 at every location, float32 at the top anchors' locations
    assert isinstance(head, RefinedRPNHead)
    assert {p.dtype for p in head.low.parameters()} == {torch.bfloat16}
    assert head.window_weight.dtype == head.predictor_weight.dtype == torch.float32
    images, _ = shapes(16, seed=1)
    matched = total = 0
    with torch.inference_mode():
        for img in images:
            ref, got = fp32([img])[0], bf16([img])[0]
            assert got["boxes"].dtype == torch.float32 and got["scores"].dtype == torch.float32
            assert int((ref["scores"] > 0.5).sum()) >= 1, "the model should have learnt"
            a = compare_detections(ref, got, iou=0.95, score_tol=0.02, min_score=0.07)
            matched, total = matched + a.matched, total + a.reference
    assert total >= 16 and matched / total >= 0.99, (matched, total)


@needs_native_bf16
def test_proposals_of_a_bf16_model(trained):
    """``proposals()`` takes the input dtype the bf16 backbone runs in (it used to feed it
    float32 and fail), and gives float32's proposals up to bf16's error."""
    fp32 = optimize_for_inference(copy.deepcopy(trained), precision="fp32")
    bf16 = optimize_for_inference(copy.deepcopy(trained), precision="bf16")
    images, _ = shapes(4, seed=2)
    with torch.inference_mode():
        for img in images:
            want, got = fp32.proposals([img])[0], bf16.proposals([img])[0]
            assert got.dtype == torch.float32 and got.shape == want.shape
            # the top proposals come back (a near-tie in the RPN's NMS may swap one)
            best = box_iou(want[:20], got).max(dim=1).values
            assert float((best > 0.99).float().mean()) >= 0.9, best


def test_refined_rpn_head_is_float32_at_the_top_anchors():
    """The bf16 RPN head gives the float32 head's logits and deltas (from the same bf16
    features) at every location of its top anchors, image borders included; elsewhere
    bf16's approximation."""
    torch.manual_seed(0)
    head = RPNHead(32, num_anchors=3).eval()
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.1)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    feats = [torch.randn(2, 32, h, w).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last) for h, w in ((37, 53), (19, 1), (2, 3))]
    k = 40
    refined = RefinedRPNHead(head, refine_topk=k, dtype=torch.bfloat16)
    with torch.no_grad():
        want_logits, want_deltas = head([f.float() for f in feats])
        got_logits, got_deltas = refined(feats)
    for want_l, want_d, got_l, got_d in zip(want_logits, want_deltas, got_logits, got_deltas):
        assert got_l.dtype == got_d.dtype == torch.float32
        n, a, h, w = want_l.shape
        for i in range(n):
            # the reference's top half: their bf16 ranks are surely within the top k
            top = want_l[i].reshape(-1).topk(min(k // 2, a * h * w)).indices % (h * w)
            loc = torch.unique(top)
            torch.testing.assert_close(got_l[i].reshape(a, -1)[:, loc],
                                       want_l[i].reshape(a, -1)[:, loc], rtol=0, atol=1e-4)
            torch.testing.assert_close(got_d[i].reshape(4 * a, -1)[:, loc],
                                       want_d[i].reshape(4 * a, -1)[:, loc], rtol=0, atol=1e-4)
        if a * h * w <= k:  # small levels: every location refined
            torch.testing.assert_close(got_l, want_l, rtol=0, atol=1e-4)
        else:  # the others stay bf16: close, not equal
            diff = (got_l - want_l).abs()
            assert 0 < float(diff.max()) < 0.2


def _agreement(reference, candidate, images):
    matched = total = 0
    for img in images:
        ref, got = reference([img])[0], candidate([img])[0]
        assert got["boxes"].dtype == torch.float32
        a = compare_detections(ref, got, iou=0.95, score_tol=0.02, min_score=0.07)
        matched, total = matched + a.matched, total + a.reference
    return matched, total


@needs_native_bf16
def test_openvino_bf16_keeps_detections(trained, tmp_path):
    """An OpenVINO IR export holds preprocess, backbone and heads graphs too; the openvino
    runtime's bf16 compiles the backbone in bf16, the preprocessing and heads in float32,
    as the torch bf16 mode does. Measured on the shapes default (250 val images): 98.7%
    kept (torch bf16: 98.9%; OpenVINO's own bf16 on the whole graph: 86%), box AP 71.53
    against float32's 71.51. The bar here is 98%: on 16 images one detection is 1%."""
    info = export_model(trained, tmp_path, "openvino")
    assert [info.parts[k] for k in ("preprocess", "backbone", "heads")] == [
        "preprocess.xml", "backbone.xml", "heads.xml"]
    f32 = load_exported(tmp_path, "openvino", precision="fp32")
    bf16 = load_exported(tmp_path, "openvino", precision="bf16")
    assert bf16.arrangement.startswith("split")
    pre, backbone, heads = bf16.stage_precisions()
    assert set(backbone["Convolution"]) == {"bf16"}
    assert "bf16" not in {p for counts in pre.values() for p in counts}
    for kind in ("Convolution", "FullyConnected", "ROIAlign", "Softmax", "TopK"):
        if kind in heads:
            assert set(heads[kind]) == {"f32"}, (kind, heads[kind])
    images, _ = shapes(16, seed=1)
    with torch.inference_mode():
        matched, total = _agreement(f32, bf16, images)
    assert total >= 16 and matched / total >= 0.98, (matched, total)


@needs_native_bf16
def test_openvino_default_bf16_keeps_the_graph_tail_in_float32(trained, tmp_path, caplog):
    """OpenVINO's own bf16 (an ONNX export without the split graphs) runs every convolution
    and fully connected layer in bf16 (the RPN head and the box head too), and keeps the
    graph tail (decoding, softmax, top-k, NMS, rescaling) in float32. It holds detections
    more loosely (measured on the trained shapes default: 87% under the bf16 bar, AP
    -0.37), and the runtime warns."""
    export_model(trained, tmp_path, "onnx")
    f32 = load_exported(tmp_path, "openvino", precision="fp32")
    with caplog.at_level("WARNING"):
        bf16 = load_exported(tmp_path, "openvino", precision="bf16")
    assert bf16.arrangement == "openvino default bf16"
    assert "loses detections" in caplog.text
    precisions = bf16.runtime_precisions()
    assert set(precisions["Convolution"]) == {"bf16"}
    for tail in ("Softmax", "TopK"):
        assert set(precisions[tail]) == {"f32"}, (tail, precisions[tail])
    images, _ = shapes(8, seed=1)
    matched, total = _agreement(f32, bf16, images)
    assert total >= 16 and matched / total >= 0.75, (matched, total)


@pytest.fixture
def tiny_detector():
    """The shapes default's R18-FPN Faster R-CNN, untrained, in eval mode."""
    from detection.engine.loading import build_model_from_cfg
    from segmentation.config import load_config

    torch.manual_seed(0)
    return build_model_from_cfg(load_config("faster_rcnn_r18_fpn_shapes.yaml")).eval()


def test_optimize_for_inference_refuses_bf16_on_a_cpu_without_it(tiny_detector):
    with simulate_cpu(AVX2_CPU):
        with pytest.raises(PrecisionUnavailable, match="avx512_bf16"):
            optimize_for_inference(tiny_detector, precision="bf16")
        model = optimize_for_inference(tiny_detector, precision="auto")
    assert model.precision == "fp32"
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_simulated_bf16_cpu_makes_auto_pick_bf16_in_the_model(tiny_detector):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels to run the bf16 model with")
    with simulate_cpu(AMX_CPU):
        model = optimize_for_inference(tiny_detector, precision="auto")
    assert model.precision == "bf16"
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}


def test_load_model_auto_runs_float32_without_native_bf16_and_says_so(caplog):
    from detection.modeling.predictor import load_model

    config = str(REPO / "configs" / "faster_rcnn_r18_fpn_shapes.yaml")
    with simulate_cpu(AVX2_CPU), caplog.at_level(logging.INFO):
        model = load_model(config)  # precision="auto"
        with pytest.raises(PrecisionUnavailable, match="AMD EPYC"):
            load_model(config, precision="bf16")
    assert model.precision == "fp32"
    assert "Inference in fp32 (asked: auto)" in caplog.text


def test_openvino_bf16_refused_without_native_bf16(tiny_detector, tmp_path):
    pytest.importorskip("openvino")
    export_model(tiny_detector, tmp_path, "onnx")
    with simulate_cpu(AVX2_CPU):
        with pytest.raises(PrecisionUnavailable, match="for OpenVINO"):
            load_exported(tmp_path, "openvino", precision="bf16")
        assert load_exported(tmp_path, "openvino", precision="auto").precision == "fp32"
        assert load_exported(tmp_path, "onnxruntime", precision="auto").precision == "fp32"


def test_openvino_int8_keeps_detections(trained, tmp_path):
    """The backbone graph quantized to int8 by NNCF (calibrated on training images; the stem
    and res2 left in float32), the preprocessing and heads in float32. int8 moves detections
    more than bf16: on 16 held-out images of this briefly trained model at least 85% of
    float32's detections come back with the same label, IoU > 0.8 and a score within 0.1
    (measured: 92%), and at least 70% at the bf16 bar, IoU > 0.95 and a score within 0.02
    (measured: 83%; 92% on the trained shapes default, whose box AP it keeps:
    docs/benchmarks.md)."""
    pytest.importorskip("openvino", reason="int8 runs in OpenVINO: pip install openvino")
    pytest.importorskip("nncf", reason="int8 quantization needs NNCF: pip install nncf")
    from detection.deploy.quantize import quantize_export

    export_model(trained, tmp_path, "openvino")
    calibration, _ = shapes(32, seed=0)  # the training images
    quantize_export(tmp_path, calibration)
    f32 = load_exported(tmp_path, "openvino", precision="fp32")
    int8 = load_exported(tmp_path, "openvino", precision="int8")
    assert int8.arrangement.startswith("split: backbone int8")
    _, backbone, heads = int8.stage_precisions()
    convs = backbone["Convolution"]
    assert convs.get("i8", 0) + convs.get("u8", 0) >= 10 and convs.get("f32", 0) >= 5, convs
    for kind in ("FullyConnected", "ROIAlign", "Softmax", "TopK"):
        if kind in heads:
            assert set(heads[kind]) == {"f32"}, (kind, heads[kind])
    images, _ = shapes(16, seed=1)
    strict = loose = total = 0
    with torch.inference_mode():
        for img in images:
            ref, got = f32([img])[0], int8([img])[0]
            a = compare_detections(ref, got, iou=0.95, score_tol=0.02, min_score=0.07)
            strict, total = strict + a.matched, total + a.reference
            loose += compare_detections(ref, got, iou=0.8, score_tol=0.1, min_score=0.07).matched
    assert total >= 16 and loose / total >= 0.85 and strict / total >= 0.7, (
        strict, loose, total)
    export_model(trained, tmp_path / "plain", "openvino")
    with pytest.raises(ValueError, match="no int8 backbone"):
        load_exported(tmp_path / "plain", "openvino", precision="int8")


def test_openvino_int8_accuracy_control_keeps_99_percent(trained, tmp_path):
    """With validation images, NNCF's accuracy control puts the layers that move detections
    most back into float32 until at most 1% of float32's detections on those images are lost
    at the bf16 bar (plain int8 keeps about 83% of this briefly trained model's). Here only
    res3 and the FPN's lateral convs are candidates (the rest given to ``keep_float``), so
    that the ranking stays short; this fragile model may need all of them back. The runtime
    that loads the export keeps what the quantizer measured, and runs in float32 exactly the
    convolutions export.json names."""
    pytest.importorskip("openvino", reason="int8 runs in OpenVINO: pip install openvino")
    pytest.importorskip("nncf", reason="int8 quantization needs NNCF: pip install nncf")
    import json
    import re

    from detection.deploy.quantize import KEEP_FLOAT, detections_kept, quantize_export

    export_model(trained, tmp_path, "openvino")
    calibration, _ = shapes(32, seed=0)
    checked, _ = shapes(16, seed=2)
    keep = (*KEEP_FLOAT, r".*/res4/.*", r".*/res5/.*", r".*/output_convs.*")
    quantize_export(tmp_path, calibration, keep_float=keep, validation_images=checked,
                    max_drop=0.01)
    parts = json.loads((tmp_path / "export.json").read_text())["parts"]
    f32 = load_exported(tmp_path, "openvino", precision="fp32")
    int8 = load_exported(tmp_path, "openvino", precision="int8")
    with torch.inference_mode():
        kept = detections_kept([f32([img])[0] for img in checked],
                               [int8([img])[0] for img in checked])
    assert parts["int8_validation_images"] == 16
    assert parts["int8_detections_kept"] >= 0.99
    assert abs(kept - parts["int8_detections_kept"]) < 1e-6
    floats = parts["int8_float_convs"]
    kept_float = [n for n in floats if any(re.fullmatch(k, n) for k in keep)]
    assert len(kept_float) == 19  # the stem, res2, res4, res5 and the FPN's output convs
    assert len(floats) > len(kept_float)  # at least one candidate returned to float32
    _, backbone, _ = int8.stage_precisions()
    convs = backbone["Convolution"]
    assert convs.get("f32", 0) == len(floats), convs  # float32 weights kept float32
    assert convs.get("u8", 0) + convs.get("i8", 0) == 28 - len(floats), convs
