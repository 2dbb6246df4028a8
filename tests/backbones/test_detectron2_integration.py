"""Our ResNet-FPN inside a real detectron2: a detectron2 config names our builder, and
detectron2's own GeneralizedRCNN trains and infers with it. Skipped where detectron2 is not
installed (it is not a dependency of this project)."""

import itertools
import math

import pytest
import torch
import torchvision

pytest.importorskip("detectron2")

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import SimpleTrainer  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model  # noqa: E402
from detectron2.modeling.meta_arch import GeneralizedRCNN  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import backbones.integrations.detectron2 as detkit_d2  # noqa: E402

FPN_YAML = """
_BASE_: "{base}"
MODEL:
  DEVICE: cpu
  BACKBONE: {{NAME: build_detkit_resnet_fpn_backbone, FREEZE_AT: 2}}
  DETKIT: {{BACKBONE: resnet18, WEIGHTS: "{weights}"}}
  RESNETS: {{NORM: BN, STRIDE_IN_1X1: False}}
  FPN: {{OUT_CHANNELS: 64}}
  RPN: {{PRE_NMS_TOPK_TRAIN: 300, POST_NMS_TOPK_TRAIN: 100, PRE_NMS_TOPK_TEST: 300,
         POST_NMS_TOPK_TEST: 50, BATCH_SIZE_PER_IMAGE: 64}}
  ROI_HEADS: {{NUM_CLASSES: 2, BATCH_SIZE_PER_IMAGE: 64, SCORE_THRESH_TEST: 0.0}}
  ROI_BOX_HEAD: {{FC_DIM: 128}}
  PIXEL_MEAN: [123.675, 116.28, 103.53]
  PIXEL_STD: [58.395, 57.12, 57.375]
INPUT: {{FORMAT: RGB}}
"""


def _cfg(tmp_path, yaml_text: str, **fmt):
    path = tmp_path / "detkit_d2.yaml"
    path.write_text(yaml_text.format(**fmt))
    cfg = get_cfg()
    detkit_d2.add_detkit_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


@pytest.fixture
def fpn_cfg(tmp_path):
    """detectron2's Base-RCNN-FPN with our R18-FPN, loading torchvision-named ImageNet-style
    weights from a local file through our loader."""
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = _cfg(tmp_path, FPN_YAML, base=model_zoo.get_config_file("Base-RCNN-FPN.yaml"),
               weights=weights)
    return cfg, torch.load(weights, weights_only=True)


def _sample(seed: int, size: int = 128):
    """An RGB image (0-255, CHW) with one bright square (class 0) and one dark-red
    rectangle (class 1), and its ground truth."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, size, size), 90.0) + 10 * torch.rand(3, size, size, generator=g)
    x0, y0 = (int(v) for v in torch.randint(4, 50, (2,), generator=g))
    img[:, y0:y0 + 40, x0:x0 + 40] = 250.0
    x1, y1 = (int(v) for v in torch.randint(70, 90, (2,), generator=g))
    img[0, y1:y1 + 30, x1:x1 + 20], img[1:, y1:y1 + 30, x1:x1 + 20] = 200.0, 10.0
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([[x0, y0, x0 + 40, y0 + 40], [x1, y1, x1 + 20, y1 + 30]],
                                       dtype=torch.float32))
    inst.gt_classes = torch.tensor([0, 1])
    return {"image": img, "instances": inst, "height": size, "width": size}


def test_builders_registered():
    assert detkit_d2.AVAILABLE
    for name in ("build_detkit_resnet_backbone", "build_detkit_resnet_fpn_backbone"):
        assert BACKBONE_REGISTRY.get(name) is getattr(detkit_d2, name)


def test_fpn_backbone_shapes_and_weights(fpn_cfg):
    cfg, tv_state = fpn_cfg
    backbone = build_backbone(cfg)
    assert isinstance(backbone, detkit_d2.DetectronBackbone)
    assert backbone.size_divisibility == 32
    # the weights came through our loader, converted from torchvision's names
    body = backbone.body.bottom_up
    assert torch.equal(body.stem.conv1.weight, tv_state["conv1.weight"])
    assert torch.equal(body.res3[0].bn2.running_var, tv_state["layer2.0.bn2.running_var"])
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 96, 160))
    shapes = backbone.output_shape()
    assert list(out) == list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    for name, spec in shapes.items():
        assert out[name].shape == (1, 64, math.ceil(96 / spec.stride),
                                   math.ceil(160 / spec.stride)), name


def test_detectron2_trains_and_infers_with_our_fpn(fpn_cfg):
    cfg, _ = fpn_cfg
    model = build_model(cfg)
    assert type(model) is GeneralizedRCNN
    assert isinstance(model.backbone, detkit_d2.DetectronBackbone)
    batch = [_sample(0), _sample(1)]

    def loss_on_batch() -> float:  # the same anchor and proposal samples each time
        torch.manual_seed(7)
        with torch.no_grad(), EventStorage():
            return sum(model(batch).values()).item()

    before = model.backbone.body.bottom_up.res3[0].conv1.weight.detach().clone()
    start = loss_on_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = SimpleTrainer(model, itertools.repeat(batch), optimizer)
    trainer.train(0, 20)
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    end = loss_on_batch()
    assert end < 0.75 * start, (start, end, losses)
    assert not torch.equal(model.backbone.body.bottom_up.res3[0].conv1.weight, before)

    model.eval()
    with torch.no_grad():  # detectron2 rescales to the requested output size
        out = model([{"image": batch[0]["image"], "height": 256, "width": 256}])
    inst = out[0]["instances"]
    assert inst.image_size == (256, 256) and len(inst) > 0
    boxes = inst.pred_boxes.tensor
    assert boxes.min() >= 0 and boxes.max() <= 256
    assert set(inst.pred_classes.tolist()) <= {0, 1}
    assert torch.isfinite(inst.scores).all()


C4_YAML = """
MODEL:
  DEVICE: cpu
  BACKBONE: {{NAME: build_detkit_resnet_backbone}}
  RESNETS: {{DEPTH: 50, OUT_FEATURES: [res4]}}
  RPN: {{PRE_NMS_TOPK_TEST: 200, POST_NMS_TOPK_TEST: 20}}
  ROI_HEADS: {{NUM_CLASSES: 3}}
"""


def test_c4_detector_with_our_resnet(tmp_path):
    """detectron2's default (C4) meta-architecture: our ResNet-50 up to res4, detectron2's
    Res5ROIHeads on top."""
    cfg = _cfg(tmp_path, C4_YAML)
    model = build_model(cfg)
    assert model.backbone.output_shape()["res4"].channels == 1024
    assert model.backbone.output_shape()["res4"].stride == 16
    assert type(model.backbone.body).__name__ == "ResNet"
    assert not model.backbone.body.stem.conv1.weight.requires_grad  # FREEZE_AT 2
    model.train()
    with EventStorage():
        losses = model([_sample(3, 96)])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert model.backbone.body.res4[0].conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([{"image": _sample(3, 96)["image"]}])
    assert out[0]["instances"].image_size == (96, 96)
