"""Training behaviour on tiny synthetic data: losses fall, one image is learnt, gradients reach
exactly the trainable parts; C4 trains and predicts; bad inputs give clear errors."""

import warnings

import pytest
import torch
from fvcore.common.config import CfgNode
from torchvision.ops import box_iou

from detection.modeling.build import build_model
from detection.modeling.defaults import add_model_config

SIZE = 128
COLORS = torch.tensor([[230.0, 40, 40], [40, 230, 40], [40, 40, 230]])


def tiny_cfg(c4: bool = False) -> CfgNode:
    cfg = CfgNode()
    add_model_config(cfg)
    m = cfg.MODEL
    m.PIXEL_MEAN, m.PIXEL_STD, m.INPUT_FORMAT = [128.0] * 3, [64.0] * 3, "RGB"
    m.BACKBONE.FREEZE_AT = 0
    m.RESNETS.DEPTH, m.RESNETS.NORM, m.RESNETS.STRIDE_IN_1X1 = 18, "GN", False
    m.ROI_HEADS.NUM_CLASSES = 3
    m.RPN.BATCH_SIZE_PER_IMAGE, m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64, 64
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 300, 100
    m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 300, 100
    if c4:
        m.ANCHOR_GENERATOR.SIZES = [[16, 32, 64]]
    else:
        m.BACKBONE.NAME, m.ROI_HEADS.NAME = "resnet_fpn", "StandardROIHeads"
        m.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        m.FPN.OUT_CHANNELS = 64
        m.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
        m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        m.ROI_BOX_HEAD.NUM_FC, m.ROI_BOX_HEAD.FC_DIM = 2, 128
        m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = SIZE, SIZE
    cfg.INPUT.RESIZE_IN_MODEL_TRAIN = False
    return cfg


def synthetic(n: int, seed: int = 0):
    """Rectangles of 3 colours (the class) on noise, ``SIZE`` px."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, SIZE, SIZE, generator=gen) * 80 + 60
        boxes, labels = [], []
        for _ in range(2):
            w, h = torch.randint(24, 56, (2,), generator=gen).tolist()
            x, y = torch.randint(0, SIZE - 56, (2,), generator=gen).tolist()
            c = int(torch.randint(0, 3, (1,), generator=gen))
            img[:, y:y + h, x:x + w] = COLORS[c][:, None, None]
            boxes.append([x, y, x + w, y + h])
            labels.append(c)
        images.append(img.round().to(torch.uint8))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels)})
    return images, targets


def _train(model, images, targets, iters, check=None, every=10):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=1e-4)
    history = []
    for it in range(iters):
        model.train()
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: float(v) for k, v in losses.items()})
        if check is not None and (it + 1) % every == 0 and check():
            return history, True
    return history, False


def test_losses_decrease():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images, targets = synthetic(2)
    history, _ = _train(model, images, targets, 30)

    def mean(rows, keys):
        return sum(sum(r[k] for k in keys) for r in rows) / len(rows)

    everything, rpn = list(history[0]), ["loss_rpn_cls", "loss_rpn_loc"]
    assert mean(history[-5:], everything) < 0.75 * mean(history[:3], everything), history
    assert mean(history[-5:], rpn) < 0.5 * mean(history[:3], rpn), history


def test_learns_one_image():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images, targets = synthetic(1, seed=3)
    gt = targets[0]

    def detected() -> bool:
        model.eval()
        with torch.no_grad():
            out = model(images)[0]
        keep = out["scores"] > 0.5
        if keep.sum() == 0:
            return False
        iou = box_iou(gt["boxes"], out["boxes"][keep])
        same = gt["labels"][:, None] == out["labels"][keep][None]
        return bool(((iou > 0.9) & same).any(dim=1).all())

    _, ok = _train(model, images, targets, 200, check=detected, every=20)
    assert ok, "the model did not learn the boxes of a single image"


def test_gradients_reach_trainable_parts_only():
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT = "FrozenBN", 2
    model = build_model(cfg).train()
    images, targets = synthetic(2)
    sum(model(images, targets).values()).backward()
    body = model.backbone.bottom_up
    for part in (body.stem, body.res2):
        for name, p in part.named_parameters():
            assert not p.requires_grad and p.grad is None, name
    for part in (model.rpn, model.roi_heads, body.res3, model.backbone.lateral_convs):
        for name, p in part.named_parameters():
            assert p.requires_grad and p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name


def test_c4_trains_and_predicts():
    torch.manual_seed(0)
    cfg = tiny_cfg(c4=True)
    model = build_model(cfg)
    assert [n for n, _ in model.roi_heads.box_head.named_children()] == ["res5"]
    images, targets = synthetic(2)
    history, _ = _train(model, images, targets, 3)
    assert all(v == v for h in history for v in h.values())
    model.eval()
    with torch.no_grad():
        out = model([images[0], images[1][:, :100, :90]])
    assert out[1]["boxes"].shape[1] == 4
    if out[1]["boxes"].numel():
        assert out[1]["boxes"][:, 2].max() <= 90 and out[1]["boxes"][:, 3].max() <= 100


def test_image_without_boxes_trains():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    images, targets = synthetic(2)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_eval_maps_boxes_to_input_pixels():
    model = build_model(tiny_cfg()).eval()
    model.preprocessor.min_size_test = model.preprocessor.max_size_test = 64
    img = synthetic(1)[0][0][:, :, :100]  # 128 x 100 -> resized to 64 x 50
    with torch.no_grad():
        out = model([img])[0]
    assert out["boxes"].shape[0] > 0
    assert out["boxes"][:, 2].max() <= 100 and out["boxes"][:, 3].max() <= 128
    assert out["boxes"][:, 3].max() > 64  # in input pixels, not the resized image's


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_cfg())


def test_bad_images(model):
    model.eval()
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="empty list"):
        model([])
    with pytest.raises(ValueError, match=r"image 1 has shape \(4, 64, 64\)"):
        model([img, torch.zeros(4, 64, 64, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"image 0 has shape \(64, 64\)"):
        model([torch.zeros(64, 64)])
    with pytest.raises(TypeError, match=r"image 0 .*int32"):
        model([torch.zeros(3, 64, 64, dtype=torch.int32)])
    with pytest.raises(TypeError, match="list of"):
        model(torch.zeros(2, 3, 64, 64))


def test_bad_targets(model):
    model.train()
    images, targets = synthetic(2)
    bad = [dict(t) for t in targets]
    bad[1]["boxes"] = bad[1]["boxes"].clone()
    bad[1]["boxes"][1] = torch.tensor([50.0, 10, 40, 30])
    with pytest.raises(ValueError, match="target 1: box 1"):
        model(images, bad)
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="target 0: label 3 of box 1 is outside 0..2"):
        model(images, bad)
    with pytest.raises(ValueError, match="needs targets"):
        model(images)


def test_unit_scale_input_warns_once():
    model = build_model(tiny_cfg()).eval()
    img = torch.rand(3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model([img])
            model([img])
    msgs = [str(w.message) for w in caught if "0-255" in str(w.message)]
    assert len(msgs) == 1
