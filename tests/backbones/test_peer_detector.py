"""Our backbones inside torchvision's FasterRCNN: both documented ways train."""

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

import backbones
from backbones.adapters import TorchvisionBackbone


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0], [30.0, 5.0, 60.0, 40.0]]),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[0.0, 0.0, 50.0, 50.0]]), "labels": torch.tensor([3])},
    ]


def _train_step(model, body):
    torch.manual_seed(0)
    model.train()
    images = [torch.rand(3, 128, 160), torch.rand(3, 112, 128)]
    losses = model(images, _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    opt.zero_grad()
    total.backward()
    # our backbone (stages not frozen) and FPN receive gradients
    assert body.lateral_convs[0].conv.weight.grad.abs().sum() > 0
    assert body.bottom_up.res5[0].conv1.weight.grad.abs().sum() > 0
    before = body.bottom_up.res5[0].conv1.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, body.bottom_up.res5[0].conv1.weight)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 120)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_torchvision_faster_rcnn_with_renaming_adapter():
    body = backbones.FPN(backbones.resnet18(norm="FrozenBN", freeze_at=2), out_channels=64)
    model = FasterRCNN(TorchvisionBackbone(body), num_classes=4, min_size=128, max_size=160)
    _train_step(model, body)


def test_torchvision_faster_rcnn_with_matching_pooler():
    body = backbones.FPN(backbones.resnet18(norm="FrozenBN", freeze_at=2), out_channels=64)
    pooler = MultiScaleRoIAlign(featmap_names=["p2", "p3", "p4", "p5"], output_size=7,
                                sampling_ratio=2)
    model = FasterRCNN(body, num_classes=4, box_roi_pool=pooler, min_size=128, max_size=160)
    _train_step(model, body)
