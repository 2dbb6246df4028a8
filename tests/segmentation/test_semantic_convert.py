"""torchvision's FCN and DeepLabV3 (ResNet) state dicts load into ours with the same logits."""

import pytest
import torch
from torchvision.models import segmentation as tvseg

from backbones import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from detection.modeling.calibration import calibrate_batchnorm
from segmentation.config import get_cfg
from segmentation.semantic import (
    build_semantic_model,
    load_segmentation_weights,
    torchvision_segmentation_to_ours,
)

NUM_CLASSES = 7


def _cfg(depth: int, head: str, aux: bool):
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "SemanticSegmentor",
        "MODEL.PIXEL_MEAN", str(list(IMAGENET_MEAN_RGB)),
        "MODEL.PIXEL_STD", str(list(IMAGENET_STD_RGB)),
        "MODEL.INPUT_FORMAT", "RGB",
        "MODEL.BACKBONE.NAME", "resnet", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.NORM", "BN",
        "MODEL.RESNETS.STRIDE_IN_1X1", "False",
        "MODEL.RESNETS.RES4_DILATION", "2", "MODEL.RESNETS.RES5_DILATION", "4",
        "MODEL.RESNETS.DILATION_MODE", "torchvision",
        "MODEL.SEM_SEG_HEAD.NAME", head, "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res5']",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES), "MODEL.SEM_SEG_HEAD.NORM", "BN",
        "MODEL.SEM_SEG_HEAD.AUX_LOSS", str(aux),
    ])
    return cfg


def _torchvision(name: str, aux: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(tvseg, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                 aux_loss=aux).eval()
    images = torch.rand(2, 3, 97, 129, generator=torch.Generator().manual_seed(1)) * 255

    def run() -> None:
        model(_normalize(images))

    # real statistics for every BN (random ones blow the activations up), then jitter
    calibrate_batchnorm(model, run, jitter=0.1, seed=3)
    return model


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1)
    return (images - mean) / std


def _check(name: str, depth: int, head: str, aux: bool) -> None:
    ref = _torchvision(name, aux)
    ours = build_semantic_model(_cfg(depth, head, aux)).eval()
    report = load_segmentation_weights(ours, ref.state_dict())
    assert report.missing == [] and report.unexpected == []
    images = torch.rand(2, 3, 97, 129, generator=torch.Generator().manual_seed(5)) * 255
    with torch.no_grad():
        expected = ref(_normalize(images))
        got = torch.stack([o["sem_seg"] for o in ours(list(images))])
        assert torch.isfinite(expected["out"]).all()
        # not a degenerate comparison: the predicted classes vary over the image
        assert expected["out"].argmax(1).unique().numel() >= 2
        assert expected["out"].std() > 0.1
        torch.testing.assert_close(got, expected["out"], atol=1e-4, rtol=1e-4)
        if aux:  # the auxiliary head runs in training only; compare it on the same features
            ours.train()
            ours.backbone.eval()
            ours.head.eval()
            ours.aux_head.eval()
            out = ours.forward_logits(_normalize(images))
            torch.testing.assert_close(out["aux"], expected["aux"], atol=1e-4, rtol=1e-4)


def test_fcn_resnet50_with_aux_equals_torchvision():
    _check("fcn_resnet50", 50, "FCNHead", aux=True)


def test_deeplabv3_resnet50_equals_torchvision():
    _check("deeplabv3_resnet50", 50, "DeepLabV3Head", aux=False)


@pytest.mark.slow
def test_deeplabv3_resnet101_with_aux_equals_torchvision():
    _check("deeplabv3_resnet101", 101, "DeepLabV3Head", aux=True)


def test_converter_names_every_key():
    ref = tvseg.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                   aux_loss=True)
    ours = torchvision_segmentation_to_ours(ref.state_dict())
    assert "head.aspp.pooling.conv.weight" in ours
    assert "head.aspp.branches.3.norm.running_var" in ours
    assert "head.predictor.bias" in ours and "aux_head.predictor.bias" in ours
    assert "backbone.res5.2.conv3.weight" in ours and "backbone.stem.conv1.weight" in ours
    with pytest.raises(ValueError, match="unexpected key"):
        torchvision_segmentation_to_ours({"classifier.9.weight": torch.zeros(1)})


def test_wrong_class_count_names_the_key_and_shapes():
    ref = tvseg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    cfg = _cfg(50, "FCNHead", aux=False)
    ours = build_semantic_model(cfg)
    with pytest.raises(ValueError, match=r"head\.predictor\.weight.*\(3, 512, 1, 1\).*"
                                         r"\(7, 512, 1, 1\)"):
        load_segmentation_weights(ours, ref.state_dict())
