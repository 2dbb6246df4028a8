"""Parity with torchvision's RetinaNet (``retinanet_resnet50_fpn`` v1 and v2): torchvision's
random model with calibrated normalization statistics, converted by our loader, on odd-sized
images in float64: the same anchors, the same detections (same label, IoU > 0.99, score within
1e-3, at least 98% of torchvision's), and in training mode the same losses for the same
targets."""

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.ops import box_iou

from detection.config import load_config
from detection.modeling.build import build_retinanet
from detection.modeling.calibration import calibrate_batchnorm, textured_image
from detection.modeling.convert import load_state_dict
from detection.modeling.retinanet_convert import to_ours

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "torchvision"
MIN_SIZE, MAX_SIZE = 192, 320
SIZES = ((203, 301), (250, 187))  # odd sizes, both orientations


def _images():
    gen = torch.Generator().manual_seed(0)
    return [textured_image(h, w, noise=0.15, generator=gen) for h, w in SIZES]


def _reference(builder):
    """torchvision's model, random, with heads lively enough that hundreds of detections pass
    0.05 with spread-out scores, and the background logit (class 0) silenced, as training
    leaves it (it is never a target, and our converter drops it)."""
    torch.manual_seed(0)
    ref = builder(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE)
    ref.eval()
    head = ref.head
    num_anchors = head.regression_head.bbox_reg.out_channels // 4
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.Conv2d):  # variance-preserving subnets
                torch.nn.init.normal_(m.weight, std=(2 / (m.in_channels * 9)) ** 0.5)
        torch.nn.init.normal_(head.regression_head.bbox_reg.weight, std=0.003)
        calibrate_batchnorm(ref, lambda: ref([i / 255 for i in _images()]))
        # class logits spread with std 0.8 around the prior's bias (-4.6): hundreds of
        # scores above 0.05, some above 0.5
        cls = head.classification_head.cls_logits
        seen = []
        hook = cls.register_forward_hook(lambda m, i, out: seen.append(out - m.bias[:, None,
                                                                                  None]))
        ref([i / 255 for i in _images()])
        hook.remove()
        cls.weight.mul_(0.8 / torch.cat([x.flatten() for x in seen]).std())
        cls.bias.view(num_anchors, -1)[:, 0] = -30.0
    return ref


def _ours(config: str, ref):
    cfg = load_config(str(CONFIGS / config), [
        "MODEL.BACKBONE.WEIGHTS", "", "MODEL.WEIGHTS", "",
        "INPUT.MIN_SIZE_TEST", str(MIN_SIZE), "INPUT.MAX_SIZE_TEST", str(MAX_SIZE),
        "INPUT.MIN_SIZE_TRAIN", f"({MIN_SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(MAX_SIZE),
        "INPUT.RESIZE_IN_MODEL_TRAIN", "True",
    ])
    model = build_retinanet(cfg).eval()
    load_state_dict(model, to_ours(ref.state_dict()))
    return model


def _captured(module, name, store):
    return module.register_forward_hook(lambda mod, i, out: store.update({name: out}))


def _check_detections(ref, ours):
    ref, ours = ref.double(), ours.double()
    imgs = _images()
    anchors = {}
    hooks = [_captured(ref.anchor_generator, "ref", anchors),
             _captured(ours.anchor_generator, "ours", anchors)]
    with torch.no_grad():
        expected = ref([i.double() / 255 for i in imgs])
        got = ours([i.double() for i in imgs])
    for h in hooks:
        h.remove()
    for ref_anchors in anchors["ref"]:  # torchvision: per image, all levels concatenated
        assert torch.equal(ref_anchors.double(), torch.cat(anchors["ours"]).double())
    found = total = 0
    box_diff = score_diff = 0.0
    for e, g in zip(expected, got):
        n = e["boxes"].shape[0]
        assert n >= 150, "the reference must return many detections"
        assert torch.isfinite(e["boxes"]).all() and torch.isfinite(e["scores"]).all()
        assert e["scores"].min() < 0.3 < e["scores"].max(), "scores should spread"
        assert (e["labels"] > 0).all()
        # IoU > 0.99, or (for the boxes that clipping flattened to zero width at the image
        # edge, whose IoU is undefined) corners within 1e-3 px
        close = (box_iou(e["boxes"], g["boxes"]) > 0.99) | \
            ((e["boxes"][:, None] - g["boxes"][None]).abs().amax(-1) < 1e-3)
        same = (e["labels"][:, None] == g["labels"][None] + 1) & close & \
            ((e["scores"][:, None] - g["scores"][None]).abs() < 1e-3)
        matched = same.any(dim=1)
        found, total = found + int(matched.sum()), total + n
        j = same.float().argmax(dim=1)[matched]
        box_diff = max(box_diff, float((e["boxes"][matched] - g["boxes"][j]).abs().max()))
        score_diff = max(score_diff, float((e["scores"][matched] - g["scores"][j]).abs().max()))
    print(f"reproduced {found}/{total} = {found / total:.2%} of torchvision's detections; "
          f"max |box diff| {box_diff:.2e} px, max |score diff| {score_diff:.2e}")
    assert found >= 0.98 * total
    assert box_diff < 1e-3 and score_diff < 1e-4


def _check_losses(ref, ours):
    """Training mode (normalization layers kept in eval mode: torchvision's random model has
    BatchNorm, our v1 config FrozenBN), the same targets, float64: the same two losses."""
    ref, ours = ref.double().train(), ours.double().train()
    for model in (ref, ours):
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    imgs = _images()
    boxes = [torch.tensor([[20.0, 30, 120, 110], [150, 40, 290, 190], [60, 60, 90, 200]]),
             torch.tensor([[10.0, 10, 170, 240], [100, 120, 140, 160]])]
    labels = [torch.tensor([1, 17, 90]), torch.tensor([5, 1])]
    ref_targets = [{"boxes": b.double(), "labels": lab} for b, lab in zip(boxes, labels)]
    our_targets = [{"boxes": b.double(), "labels": lab - 1} for b, lab in zip(boxes, labels)]
    expected = ref([i.double() / 255 for i in imgs], ref_targets)
    got = ours([i.double() for i in imgs], our_targets)
    print(f"losses: torchvision {({k: v.item() for k, v in expected.items()})}, "
          f"ours {({k: v.item() for k, v in got.items()})}")
    assert torch.allclose(got["loss_cls"], expected["classification"], rtol=1e-6)
    assert torch.allclose(got["loss_box_reg"], expected["bbox_regression"], rtol=1e-6)
    assert float(got["loss_box_reg"]) > 0


@pytest.mark.parametrize("builder, config", [
    (retinanet_resnet50_fpn, "retinanet_resnet50_fpn.yaml"),
    (retinanet_resnet50_fpn_v2, "retinanet_resnet50_fpn_v2.yaml"),
], ids=["v1", "v2"])
def test_torchvision_parity(builder, config):
    ref = _reference(builder)
    ours = _ours(config, ref)
    _check_detections(ref, ours)
    _check_losses(ref, ours)


def test_published_v1_names_convert_like_todays():
    """torchvision's published v1 file names the head convs ``conv.{2i}`` (conv, ReLU pairs)
    and the FPN blocks without ``.0``; both spellings give the same state dict."""
    today = retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    published = {}
    for k, v in today.items():
        for i in range(4):
            for head in ("classification_head", "regression_head"):
                k = k.replace(f"head.{head}.conv.{i}.0.", f"head.{head}.conv.{2 * i}.")
        for kind in ("inner_blocks", "layer_blocks"):
            for i in range(3):
                k = k.replace(f"fpn.{kind}.{i}.0.", f"fpn.{kind}.{i}.")
        published[k] = v
    assert "head.classification_head.conv.6.weight" in published
    a, b = to_ours(today), to_ours(published)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 9 anchors x 91 logits -> 9 x 90: class 0 of every anchor dropped
    w = today["head.classification_head.cls_logits.weight"]
    assert a["head.cls_score.weight"].shape[0] == 9 * 90
    assert torch.equal(a["head.cls_score.weight"][90], w[92])  # anchor 1, class 1 -> ours 0
