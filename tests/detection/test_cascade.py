"""Cascade R-CNN (``MODEL.ROI_HEADS.NAME: CascadeROIHeads``): detectron2's checkpoint names load
with every key used; the cascade's semantics checked against computations written here (stage
k + 1's proposals are stage k's decoded boxes, scores are the mean of the stages' softmax,
the gradient into the box heads is scaled by 1/3); tiny models with and without masks learn;
the inference optimizer keeps the detections; the registry names it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segmentation  # noqa: F401  (registers Mask R-CNN)
from backbones.fused import FusedLinear
from detection.families import get_family
from detection.modeling import cascade
from detection.modeling.box_ops import BoxCoder
from detection.modeling.cascade import CascadeROIHeads
from detection.modeling.poolers import ROIPooler
from detection.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNPredictor
from detection.optimize import optimize_for_inference
from segmentation.config import load_config

K = 3  # foreground classes
WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
TINY = ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_HEADS.NUM_CLASSES", K,
        "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.BACKBONE.WEIGHTS", "",
        "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96]


def tiny_cascade(mask: bool, *extra) -> nn.Module:
    cfg = load_config("mask_rcnn_r18_fpn_shapes.yaml",
                      [str(v) for v in TINY] + ["MODEL.MASK_ON", str(mask), *map(str, extra)])
    return get_family(cfg).build(cfg)


# ------------------------------------------------------------------ detectron2's names


def _frozen_bn(prefix, c, sd):
    for name in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{prefix}.{name}"] = torch.randn(c) if name != "running_var" else torch.rand(c) + 0.5


def detectron2_tiny_cascade_mask_rcnn(fpn: int = 16, fc: int = 32, mask_dim: int = 8):
    """Random weights under detectron2's names for an R18-FPN Cascade Mask R-CNN
    (FrozenBN, ``fpn`` FPN channels, 2 FCs of ``fc``, one ``mask_dim`` mask conv)."""
    sd = {}
    b = "backbone.bottom_up"
    sd[f"{b}.stem.conv1.weight"] = torch.randn(64, 3, 7, 7) * 0.05
    _frozen_bn(f"{b}.stem.conv1.norm", 64, sd)
    in_c = 64
    for stage, out_c in zip((2, 3, 4, 5), (64, 128, 256, 512)):
        for i in range(2):
            p = f"{b}.res{stage}.{i}"
            c = in_c if i == 0 else out_c
            sd[f"{p}.conv1.weight"] = torch.randn(out_c, c, 3, 3) * 0.05
            _frozen_bn(f"{p}.conv1.norm", out_c, sd)
            sd[f"{p}.conv2.weight"] = torch.randn(out_c, out_c, 3, 3) * 0.05
            _frozen_bn(f"{p}.conv2.norm", out_c, sd)
            if i == 0 and c != out_c:
                sd[f"{p}.shortcut.weight"] = torch.randn(out_c, c, 1, 1) * 0.05
                _frozen_bn(f"{p}.shortcut.norm", out_c, sd)
        sd[f"backbone.fpn_lateral{stage}.weight"] = torch.randn(fpn, out_c, 1, 1) * 0.05
        sd[f"backbone.fpn_lateral{stage}.bias"] = torch.randn(fpn)
        sd[f"backbone.fpn_output{stage}.weight"] = torch.randn(fpn, fpn, 3, 3) * 0.05
        sd[f"backbone.fpn_output{stage}.bias"] = torch.randn(fpn)
        in_c = out_c
    r = "proposal_generator.rpn_head"
    for name, shape in (("conv", (fpn, fpn, 3, 3)), ("objectness_logits", (3, fpn, 1, 1)),
                        ("anchor_deltas", (12, fpn, 1, 1))):
        sd[f"{r}.{name}.weight"], sd[f"{r}.{name}.bias"] = torch.randn(shape), torch.randn(shape[0])
    for k in range(3):
        for name, shape in (("box_head.{k}.fc1", (fc, fpn * 7 * 7)), ("box_head.{k}.fc2", (fc, fc)),
                            ("box_predictor.{k}.cls_score", (K + 1, fc)),
                            ("box_predictor.{k}.bbox_pred", (4, fc))):
            key = "roi_heads." + name.format(k=k)
            sd[f"{key}.weight"], sd[f"{key}.bias"] = torch.randn(shape), torch.randn(shape[0])
    m = "roi_heads.mask_head"
    for name, shape in (("mask_fcn1", (mask_dim, fpn, 3, 3)),
                        ("deconv", (mask_dim, mask_dim, 2, 2)),
                        ("predictor", (K, mask_dim, 1, 1))):
        sd[f"{m}.{name}.weight"], sd[f"{m}.{name}.bias"] = torch.randn(shape), torch.randn(shape[0])
    sd["pixel_mean"], sd["pixel_std"] = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    return sd


def test_detectron2_cascade_checkpoint_loads_with_every_key_used(tmp_path):
    sd = detectron2_tiny_cascade_mask_rcnn()
    path = tmp_path / "cascade.pth"
    torch.save({"model": sd}, path)
    model = tiny_cascade(True, "MODEL.RESNETS.NORM", "FrozenBN")
    family = get_family(load_config("mask_rcnn_r18_fpn_shapes.yaml", ["MODEL.MASK_ON", "True"]))
    family.load_weights(model, str(path))  # strict: every parameter given, every key used
    own = model.state_dict()
    for k in range(3):  # the stages land in their own heads
        assert torch.equal(own[f"roi_heads.box_head.{k}.fcs.1.weight"],
                           sd[f"roi_heads.box_head.{k}.fc2.weight"])
        assert torch.equal(own[f"roi_heads.box_predictor.{k}.bbox_pred.weight"],
                           sd[f"roi_heads.box_predictor.{k}.bbox_pred.weight"])
        assert own[f"roi_heads.box_predictor.{k}.bbox_pred.weight"].shape == (4, 32)
    assert torch.equal(own["roi_heads.mask_head.convs.0.conv.weight"],
                       sd["roi_heads.mask_head.mask_fcn1.weight"])
    assert torch.equal(own["backbone.bottom_up.res3.0.downsample.1.running_var"],
                       sd["backbone.bottom_up.res3.0.shortcut.norm.running_var"])

    for extra, named in (("roi_heads.box_refiner.weight", "roi_heads.box_refiner.weight"),
                         ("roi_heads.box_head.3.fc1.weight", "roi_heads.box_head.3.fcs.0")):
        bad = dict(sd, **{extra: torch.zeros(1)})
        torch.save({"model": bad}, path)
        with pytest.raises(KeyError, match=named.replace(".", r"\.")):
            family.load_weights(model, str(path))


# ------------------------------------------------------------------ the cascade's semantics


def decode(deltas, boxes, weights):
    """R-CNN box decoding, written out: ``deltas`` (R, 4) on ``boxes`` (R, 4)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw = (deltas[:, 2] / weights[2]).clamp(max=torch.log(torch.tensor(1000.0 / 16)))
    dh = (deltas[:, 3] / weights[3]).clamp(max=torch.log(torch.tensor(1000.0 / 16)))
    x, y = cx + dx * w, cy + dy * h
    pw, ph = w * dw.exp(), h * dh.exp()
    return torch.stack([x - pw / 2, y - ph / 2, x + pw / 2, y + ph / 2], dim=1)


def clip(boxes, h, w):
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                        boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)


H = W = 64


def small_heads(**options) -> CascadeROIHeads:
    torch.manual_seed(0)
    heads = [FastRCNNConvFCHead(in_channels=8, resolution=4, fc_dims=(16,)) for _ in range(3)]
    predictors = [FastRCNNPredictor(16, K, class_agnostic=True) for _ in range(3)]
    for p in predictors:  # lively regressions, so that the stages' boxes differ
        nn.init.normal_(p.bbox_pred.weight, std=0.3)
        nn.init.normal_(p.cls_score.weight, std=0.3)
    return CascadeROIHeads(
        in_features=["p2"], pooler=ROIPooler(output_size=4, strides=[4], sampling_ratio=2,
                                             aligned=True),
        box_heads=heads, box_predictors=predictors,
        box_coders=[BoxCoder(w) for w in WEIGHTS], stage_ious=(0.5, 0.6, 0.7),
        num_classes=K, batch_size_per_image=32, **options)


def inputs():
    gen = torch.Generator().manual_seed(1)
    features = {"p2": torch.randn(2, 8, H // 4, W // 4, generator=gen)}
    xy = torch.rand(2, 20, 2, generator=gen) * 40
    wh = torch.rand(2, 20, 2, generator=gen) * 20 + 4
    proposals = list(torch.cat([xy, xy + wh], dim=2))
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 40.0], [30.0, 20.0, 60.0, 44.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[4.0, 30.0, 40.0, 60.0]]), "labels": torch.tensor([1])}]
    return features, proposals, [(H, W), (H, W)], targets


def test_stages_refine_the_previous_stage_boxes_and_average_their_scores():
    heads = small_heads(score_thresh=0.0, nms_thresh=1.0, detections_per_image=1000).eval()
    features, proposals, sizes, _ = inputs()
    with torch.no_grad():
        stages = heads.run_stages(features, proposals, sizes)
        detections, _ = heads(features, proposals, sizes)
    assert len(stages) == 3
    for k in (1, 2):  # stage k's proposals: stage k-1's class-agnostic boxes, clipped
        prev = stages[k - 1]
        assert prev.deltas.shape == (40, 4)
        expected = clip(decode(prev.deltas, torch.cat(prev.boxes), WEIGHTS[k - 1]), H, W)
        torch.testing.assert_close(torch.cat(stages[k].boxes), expected)
        assert not torch.allclose(torch.cat(stages[k].boxes), torch.cat(prev.boxes))
    # scores: the mean over the stages of each stage's softmax; boxes: the last stage's
    probs = torch.stack([F.softmax(s.logits, dim=1) for s in stages]).mean(0)[:, :K]  # [R, K]
    last = stages[-1]
    boxes = clip(decode(last.deltas, torch.cat(last.boxes), WEIGHTS[2]), H, W)
    for i, det in enumerate(detections):
        rows = slice(20 * i, 20 * (i + 1))
        assert det.scores.numel() == 20 * K  # threshold 0, NMS at IoU 1: every (box, class)
        torch.testing.assert_close(det.scores.sort().values, probs[rows].flatten().sort().values)
        r = torch.cdist(det.boxes, boxes[rows]).argmin(dim=1)
        torch.testing.assert_close(det.boxes, boxes[rows][r])
        torch.testing.assert_close(det.scores, probs[rows][r, det.labels])


def test_the_gradient_into_the_box_heads_is_a_third_of_the_stages_sum(monkeypatch):
    heads = small_heads().train()
    features, proposals, sizes, targets = inputs()

    def grads():
        torch.manual_seed(0)  # the same sampled RoIs in each run
        feats = {"p2": features["p2"].clone().requires_grad_()}
        heads.zero_grad()
        _, losses = heads(feats, proposals, sizes, targets)
        per_stage = [sum(v for n, v in losses.items() if n.endswith(f"_stage{k}"))
                     for k in range(3)]
        g = [torch.autograd.grad(loss, feats["p2"], retain_graph=True)[0] for loss in per_stage]
        sum(losses.values()).backward()
        params = {n: p.grad.clone() for n, p in heads.named_parameters()}
        return feats["p2"].grad, g, params, losses

    scaled, scaled_per_stage, params, losses = grads()
    assert sorted(losses) == sorted(f"{n}_stage{k}" for n in ("loss_cls", "loss_box_reg")
                                    for k in range(3))
    monkeypatch.setattr(cascade, "scale_gradient", lambda x, scale: x)
    unscaled, per_stage, unscaled_params, _ = grads()
    assert scaled.abs().sum() > 0
    torch.testing.assert_close(scaled, sum(per_stage) / 3)
    torch.testing.assert_close(scaled, unscaled / 3)
    for s, u in zip(scaled_per_stage, per_stage):
        torch.testing.assert_close(s, u / 3)
    for name, g in params.items():  # the heads' own parameters get their full gradients
        torch.testing.assert_close(g, unscaled_params[name])


def test_later_stages_label_at_their_iou_without_resampling():
    heads = small_heads().train()
    features, proposals, sizes, targets = inputs()
    torch.manual_seed(0)
    stages = heads.run_stages(features, proposals, sizes, targets)
    assert stages[0].rois.boxes[0].shape[0] == 22  # 20 proposals + 2 ground-truth boxes
    for k in (1, 2):
        for img, t in enumerate(targets):
            boxes, labels = stages[k].rois.boxes[img], stages[k].rois.labels[img]
            assert boxes.shape[0] <= stages[k - 1].rois.boxes[img].shape[0]
            iou = torch.stack([torch.zeros(boxes.shape[0])] + [
                _iou(boxes, g[None]) for g in t["boxes"]]).max(0)
            fg = iou.values >= heads.stage_ious[k]
            assert torch.equal(labels[~fg], torch.full_like(labels[~fg], K))
            assert torch.equal(labels[fg], t["labels"][iou.indices[fg] - 1])


def _iou(a, b):
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ------------------------------------------------------------------ training and inference


def synthetic():
    """Two 64x96 images with two coloured rectangles each (class = colour), with masks."""
    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    colours = torch.tensor([[230.0, 40, 40], [40, 230, 40], [40, 40, 230]])
    for boxes, labels in (([[6, 8, 40, 50], [50, 20, 90, 60]], [0, 2]),
                          ([[10, 30, 60, 62], [62, 4, 92, 30]], [1, 0])):
        img = torch.rand(3, 64, 96, generator=gen) * 60 + 40
        masks = torch.zeros(2, 64, 96, dtype=torch.uint8)
        for j, ((x0, y0, x1, y1), c) in enumerate(zip(boxes, labels)):
            img[:, y0:y1, x0:x1] = colours[c][:, None, None]
            masks[j, y0:y1, x0:x1] = 1
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels), "masks": masks})
    return images, targets


@pytest.fixture(scope="module")
def trained():
    """A tiny Cascade R-CNN and Cascade Mask R-CNN (the ResNet frozen, for time), each after 6
    Adam steps on one batch, with their losses at each step."""
    torch.manual_seed(0)
    images, targets = synthetic()
    out = {}
    for mask in (False, True):
        model = tiny_cascade(mask, "MODEL.BACKBONE.FREEZE_AT", 5).train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        history = []
        for _ in range(6):
            losses = model(images, copy.deepcopy(targets))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            history.append({k: v.item() for k, v in losses.items()})
        out[mask] = (model.eval(), history)
    return out


@pytest.mark.parametrize("mask", [False, True], ids=["cascade", "cascade_mask"])
def test_tiny_cascade_trains_with_losses_per_stage(trained, mask):
    model, history = trained[mask]
    names = {f"{n}_stage{k}" for n in ("loss_cls", "loss_box_reg") for k in range(3)}
    names |= {"loss_rpn_cls", "loss_rpn_loc"} | ({"loss_mask"} if mask else set())
    assert set(history[0]) == names
    first, last = sum(history[0].values()), sum(history[-1].values())
    assert last < 0.8 * first, (first, last)
    for k in range(3):
        assert history[-1][f"loss_cls_stage{k}"] < history[0][f"loss_cls_stage{k}"]
    with torch.no_grad():
        out = model(synthetic()[0][:1])[0]
    assert {"boxes", "scores", "labels"} <= set(out)
    if mask:
        assert out["masks"].shape[0] == out["boxes"].shape[0]


def test_optimize_for_inference_keeps_the_cascade_detections(trained):
    model = trained[True][0]
    image = synthetic()[0][:1]
    with torch.no_grad():
        ref = model(image)[0]
        fast = optimize_for_inference(copy.deepcopy(model))
        out = fast(image)[0]
    for head in fast.roi_heads.box_head:  # each stage's declared ReLU layers fused
        assert all(isinstance(fc, FusedLinear) for fc in head.fcs)
    assert ref["boxes"].shape[0] > 0
    assert out["boxes"].shape == ref["boxes"].shape
    torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(out["scores"], ref["scores"], atol=1e-4, rtol=1e-3)
    assert torch.equal(out["labels"], ref["labels"])
    torch.testing.assert_close(out["masks"], ref["masks"], atol=1e-3, rtol=1e-3)


def test_unknown_roi_heads_name_lists_the_cascade():
    with pytest.raises(ValueError, match=r"unknown MODEL.ROI_HEADS.NAME 'NoSuchHeads'.*"
                                         r"'CascadeROIHeads'"):
        tiny_cascade(False, "MODEL.ROI_HEADS.NAME", "NoSuchHeads")


def test_first_cascade_iou_must_be_the_sampler_threshold():
    with pytest.raises(ValueError, match="IOU_THRESHOLDS"):
        tiny_cascade(False, "MODEL.ROI_HEADS.IOU_THRESHOLDS", "[0.4]")
