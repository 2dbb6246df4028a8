"""SemanticSegmentor and its heads on tiny inputs: shapes, padding, losses, config building."""

import pytest
import torch

from backbones import FPN, ShapeSpec, resnet18
from detection.engine.evaluation import build_evaluator
from detection.engine.loading import build_model_from_cfg
from detection.engine.result_tables import format_ap_line, format_ap_table
from segmentation.config import ConfigKeyError, get_cfg, load_config
from segmentation.semantic import (
    ASPP,
    DeepLabV3Head,
    FCNHead,
    SemanticFPNHead,
    SemanticSegmentor,
    SemSegEvaluator,
    build_semantic_model,
)

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _fpn_model(num_classes: int = 3) -> SemanticSegmentor:
    torch.manual_seed(0)
    fpn = FPN(resnet18(norm="GN"), out_channels=32, top_block=None, norm="GN")
    head = SemanticFPNHead(fpn.output_shape(), num_classes=num_classes, conv_dims=32)
    return SemanticSegmentor(backbone=fpn, head=head, pixel_mean=MEAN, pixel_std=STD,
                             size_divisibility=fpn.size_divisibility)


def test_fpn_head_brings_every_level_to_stride_4():
    shapes = {f"p{i}": ShapeSpec(16, 2**i) for i in range(2, 6)}
    head = SemanticFPNHead(shapes, num_classes=5, conv_dims=32)
    # p2 one conv, p3 one, p4 two, p5 three: conv + upsample until stride 4
    assert [len(head.scale_heads[f"p{i}"]) for i in range(2, 6)] == [1, 1, 2, 3]
    feats = {f"p{i}": torch.randn(2, 16, 64 // 2**i, 96 // 2**i) for i in range(2, 6)}
    assert head(feats).shape == (2, 5, 16, 24)


def test_deeplab_and_fcn_heads_keep_the_input_resolution():
    spec = ShapeSpec(64, 8)
    x = {"res5": torch.randn(2, 64, 9, 11)}
    head = DeepLabV3Head(spec, in_feature="res5", num_classes=4, rates=(6, 12, 18), channels=32,
                         norm="GN")
    assert head(x).shape == (2, 4, 9, 11)
    assert len(head.aspp.branches) == 4  # 1x1 + three rates; image pooling apart
    assert FCNHead(spec, in_feature="res5", num_classes=4)(x).shape == (2, 4, 9, 11)
    aspp = ASPP(64, (2,), out_channels=32, norm="GN").eval()
    y = aspp.pooling(x["res5"])
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))  # image pooling: constant per map


def test_eval_returns_logits_at_each_input_size():
    model = _fpn_model().eval()
    images = [torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8),
              torch.randint(0, 256, (3, 64, 60), dtype=torch.uint8)]
    with torch.no_grad():
        out = model(images)
        alone = model(images[:1])
    assert [o["sem_seg"].shape for o in out] == [(3, 70, 90), (3, 64, 60)]
    assert torch.isfinite(out[0]["sem_seg"]).all()
    # padded to 96x96 either way (divisible by 32), so batching changes nothing
    torch.testing.assert_close(out[0]["sem_seg"], alone[0]["sem_seg"], atol=1e-5, rtol=1e-5)


def test_training_loss_skips_the_ignore_label_and_the_padding():
    model = _fpn_model().train()
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
              torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)]
    targets = [{"sem_seg": torch.randint(0, 3, (64, 64))},
               {"sem_seg": torch.full((48, 80), 255, dtype=torch.long)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_sem_seg"}
    losses["loss_sem_seg"].backward()
    assert model.head.predictor.weight.grad is not None
    # an all-ignored image contributes nothing: the loss equals the first image's alone
    model.zero_grad()
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()  # BN-free (GN) model: train and eval forwards agree
        logits = model(images)[0]["sem_seg"]
    expected = torch.nn.functional.cross_entropy(logits[None], targets[0]["sem_seg"][None])
    model.train()
    with torch.no_grad():
        got = model(images, targets)["loss_sem_seg"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_have_clear_errors():
    model = _fpn_model().train()
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs targets"):
        model([image])
    with pytest.raises(ValueError, match=r"\(60, 64\) does not match its image \(64, 64\)"):
        model([image], [{"sem_seg": torch.zeros(60, 64, dtype=torch.long)}])
    with pytest.raises(TypeError, match="list"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.warns(UserWarning, match="0-255"):
        model.eval()([torch.rand(3, 64, 64)])


def _shapes_cfg(*opts: str):
    return load_config("semantic_fpn_r18_shapes.yaml", list(opts))


def test_embedded_config_builds_through_the_runner():
    cfg = _shapes_cfg()
    model = build_model_from_cfg(cfg)
    assert isinstance(model, SemanticSegmentor) and model.size_divisibility == 32
    cfg.MODEL.CLASS_NAMES = ["background", "circle", "rectangle", "triangle", "cross"]
    ev = build_evaluator(cfg, "shapes_val")
    assert isinstance(ev, SemSegEvaluator) and ev.class_names[1] == "circle"
    line = format_ap_line({"mIoU": 81.234, "pACC": 97.5})
    assert "mIoU 81.23" in line
    assert "| sem_seg |" in format_ap_table({"sem_seg": {"mIoU": 1.0, "pACC": 2.0}})


def test_config_keys_are_validated():
    cfg = get_cfg()
    assert cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 255
    assert cfg.MODEL.SEM_SEG_HEAD.NORM == "GN"
    with pytest.raises(ConfigKeyError, match="MODEL.SEM_SEG_HEAD.CONVS_DIM"):
        cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.CONV_DIM", "64"])


@pytest.mark.parametrize("head,features", [("DeepLabV3Head", "['res5']"),
                                           ("FCNHead", "['res5']")])
def test_dilated_heads_from_config(head, features):
    cfg = _shapes_cfg("MODEL.BACKBONE.NAME", "resnet", "MODEL.RESNETS.RES5_DILATION", "2",
                      "MODEL.SEM_SEG_HEAD.NAME", head, "MODEL.SEM_SEG_HEAD.IN_FEATURES",
                      features, "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS", "[6, 12, 18]",
                      "MODEL.SEM_SEG_HEAD.AUX_LOSS", "True", "MODEL.SEM_SEG_HEAD.NORM", "GN")
    model = build_semantic_model(cfg)
    assert model.backbone.output_shape()["res5"].stride == 16  # output stride 16
    images = [torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)] * 2
    losses = model.train()(images, [{"sem_seg": torch.randint(0, 5, (40, 56))}] * 2)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    with torch.no_grad():
        out = model.eval()(images)
    assert out[0]["sem_seg"].shape == (5, 40, 56)
