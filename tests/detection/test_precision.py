"""bf16 inference keeps a trained detector's detections: in torch at least 99% of float32's
detections come back with the same label, IoU > 0.95 and a score within 0.02 (detections
within that tolerance of the 0.05 threshold excepted), while the heads, boxes, scores and NMS
stay in float32. OpenVINO's bf16 keeps its graph tail in float32."""

import copy

import pytest
import torch

from detection.deploy import export_model, load_exported
from detection.deploy.agreement import compare_detections
from detection.engine.loading import build_model_from_cfg
from detection.modeling.precision import Cast, low_precision_parts
from segmentation.config import load_config

SIZE = 160
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


def test_bf16_keeps_detections_in_torch(trained):
    fp32 = copy.deepcopy(trained).optimize_for_inference(precision="fp32")
    bf16 = copy.deepcopy(trained).optimize_for_inference(precision="bf16")
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}
    assert low_precision_parts(bf16) == []  # Cast wrappers into bf16: none in Faster R-CNN
    assert {p.dtype for p in bf16.roi_heads.parameters()} == {torch.float32}
    assert bf16.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32
    assert isinstance(bf16.rpn.head, Cast) and bf16.rpn.head.input_dtype == torch.float32
    assert {p.dtype for p in bf16.rpn.parameters()} == {torch.float32}
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


def _agreement(reference, candidate, images):
    matched = total = 0
    for img in images:
        ref, got = reference([img])[0], candidate([img])[0]
        assert got["boxes"].dtype == torch.float32
        a = compare_detections(ref, got, iou=0.95, score_tol=0.02, min_score=0.07)
        matched, total = matched + a.matched, total + a.reference
    return matched, total


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
