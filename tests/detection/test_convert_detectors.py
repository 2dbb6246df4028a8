"""detectron2 checkpoints (names and shapes of its published R50-FPN and R50-C4 Faster R-CNN)
load into our models with every key used; the zoo and configs agree."""

from pathlib import Path

import pytest
import torch

from detection.config import get_cfg
from detection.modeling.build import build_model
from detection.modeling.convert import detect_format, detectron2_to_ours, load_state_dict, to_ours
from detection.modeling.zoo import get_detector_weights, list_detector_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BLOCKS_R50 = (3, 4, 6, 3)


def _norm(prefix, c, out):
    for p in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.norm.{p}"] = (c,)


def _stage(prefix, n_blocks, in_c, planes, out):
    for i in range(n_blocks):
        b = f"{prefix}.{i}"
        cin = in_c if i == 0 else planes * 4
        out[f"{b}.conv1.weight"] = (planes, cin, 1, 1)
        _norm(f"{b}.conv1", planes, out)
        out[f"{b}.conv2.weight"] = (planes, planes, 3, 3)
        _norm(f"{b}.conv2", planes, out)
        out[f"{b}.conv3.weight"] = (planes * 4, planes, 1, 1)
        _norm(f"{b}.conv3", planes * 4, out)
        if i == 0:
            out[f"{b}.shortcut.weight"] = (planes * 4, in_c, 1, 1)
            _norm(f"{b}.shortcut", planes * 4, out)
    return planes * 4


def _resnet(prefix, out, stages=4):
    out[f"{prefix}stem.conv1.weight"] = (64, 3, 7, 7)
    _norm(f"{prefix}stem.conv1", 64, out)
    c = 64
    channels = {}
    for k in range(stages):
        c = _stage(f"{prefix}res{k + 2}", BLOCKS_R50[k], c, 64 * 2**k, out)
        channels[k + 2] = c
    return channels


def detectron2_r50_fpn_shapes(num_classes=80):
    """Names and shapes of detectron2's faster_rcnn_R_50_FPN_*: model_final_*.pkl."""
    out = {}
    channels = _resnet("backbone.bottom_up.", out)
    for lvl, c in channels.items():
        out[f"backbone.fpn_lateral{lvl}.weight"] = (256, c, 1, 1)
        out[f"backbone.fpn_lateral{lvl}.bias"] = (256,)
        out[f"backbone.fpn_output{lvl}.weight"] = (256, 256, 3, 3)
        out[f"backbone.fpn_output{lvl}.bias"] = (256,)
    _rpn(out, 256, 3)
    out["roi_heads.box_head.fc1.weight"] = (1024, 256 * 7 * 7)
    out["roi_heads.box_head.fc1.bias"] = (1024,)
    out["roi_heads.box_head.fc2.weight"] = (1024, 1024)
    out["roi_heads.box_head.fc2.bias"] = (1024,)
    _predictor(out, 1024, num_classes)
    return out


def detectron2_r50_c4_shapes(num_classes=80):
    """Names and shapes of detectron2's faster_rcnn_R_50_C4_*: backbone up to res4, res5 in
    the RoI heads."""
    out = {}
    _resnet("backbone.", out, stages=3)
    _rpn(out, 1024, 15)
    _stage("roi_heads.res5", 3, 1024, 512, out)
    _predictor(out, 2048, num_classes)
    return out


def _rpn(out, c, a):
    out["proposal_generator.rpn_head.conv.weight"] = (c, c, 3, 3)
    out["proposal_generator.rpn_head.conv.bias"] = (c,)
    out["proposal_generator.rpn_head.objectness_logits.weight"] = (a, c, 1, 1)
    out["proposal_generator.rpn_head.objectness_logits.bias"] = (a,)
    out["proposal_generator.rpn_head.anchor_deltas.weight"] = (4 * a, c, 1, 1)
    out["proposal_generator.rpn_head.anchor_deltas.bias"] = (4 * a,)


def _predictor(out, d, k):
    out["roi_heads.box_predictor.cls_score.weight"] = (k + 1, d)
    out["roi_heads.box_predictor.cls_score.bias"] = (k + 1,)
    out["roi_heads.box_predictor.bbox_pred.weight"] = (4 * k, d)
    out["roi_heads.box_predictor.bbox_pred.bias"] = (4 * k,)


def _cfg(path):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / path))
    cfg.MODEL.BACKBONE.WEIGHTS = ""
    return cfg


@pytest.mark.parametrize("config,shapes", [
    ("detectron2/faster_rcnn_R_50_FPN_3x.yaml", detectron2_r50_fpn_shapes),
    ("detectron2/faster_rcnn_R_50_C4_3x.yaml", detectron2_r50_c4_shapes),
])
def test_detectron2_checkpoint_loads_every_key(config, shapes):
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=gen) for k, s in shapes().items()}
    ckpt = {"model": sd, "__author__": "synthetic"}
    assert detect_format(ckpt) == "detectron2"
    model = build_model(_cfg(config))
    converted = detectron2_to_ours(ckpt)
    assert len(converted) == len(sd)  # nothing dropped
    load_state_dict(model, converted)  # raises on any missing, unexpected or misshapen key
    own = model.state_dict()
    assert torch.equal(own["roi_heads.box_predictor.cls_score.weight"],
                       sd["roi_heads.box_predictor.cls_score.weight"])
    assert torch.equal(own["rpn.head.objectness.weight"],
                       sd["proposal_generator.rpn_head.objectness_logits.weight"])
    if "C4" in config:
        assert torch.equal(own["roi_heads.box_head.res5.0.bn1.running_var"],
                           sd["roi_heads.res5.0.conv1.norm.running_var"])
        assert torch.equal(own["backbone.res4.5.downsample.0.weight"]
                           if "backbone.res4.5.downsample.0.weight" in own
                           else own["backbone.res4.0.downsample.0.weight"],
                           sd["backbone.res4.0.shortcut.weight"])
    else:
        assert torch.equal(own["backbone.lateral_convs.3.conv.weight"],
                           sd["backbone.fpn_lateral5.weight"])


def test_checkpoint_for_another_architecture_is_refused():
    sd = {k: torch.zeros(s) for k, s in detectron2_r50_c4_shapes().items()}
    model = build_model(_cfg("detectron2/faster_rcnn_R_50_FPN_3x.yaml"))
    with pytest.raises(KeyError, match="missing"):
        load_state_dict(model, to_ours({"model": sd}))


def test_wrong_class_count_names_key_and_shapes():
    sd = {k: torch.zeros(s) for k, s in detectron2_r50_fpn_shapes(num_classes=20).items()}
    model = build_model(_cfg("detectron2/faster_rcnn_R_50_FPN_3x.yaml"))
    with pytest.raises(ValueError, match=r"cls_score.weight.*\(21, 1024\).*\(81, 1024\)"):
        load_state_dict(model, detectron2_to_ours(sd))


def test_zoo_entries_have_configs():
    names = list_detector_weights()
    assert "detectron2/faster_rcnn_R_101_C4_3x" in names
    for name in names:
        w = get_detector_weights(name)
        assert w.config_path.is_file(), w.config
        assert w.url.startswith("https://")
    assert get_detector_weights("detectron2/faster_rcnn_R_50_FPN_3x").box_ap == 40.2
    with pytest.raises(KeyError, match="registered"):
        get_detector_weights("nope")


def test_one_format_detection_for_every_family():
    """The families' key marks live in one table: each checkpoint's format is told for its
    own family, and a checkpoint of another family is named as such."""
    from detection.modeling.checkpoint_format import FORMAT_MARKS
    from detection.modeling.checkpoint_format import detect_format as detect

    retina = {"model": {"head.cls_subnet.0.weight": torch.zeros(1)}}
    assert detect(retina, "RetinaNet") == "detectron2"
    assert {"GeneralizedRCNN", "RetinaNet"} <= set(FORMAT_MARKS)
    with pytest.raises(ValueError, match=r"a RetinaNet checkpoint \(detectron2 format, key "
                                         r"'head.cls_subnet.0.weight'\), not a two-stage "
                                         r"\(R-CNN\) one"):
        detect_format(retina)
    torchvision_rcnn = {"rpn.head.cls_logits.weight": torch.zeros(1)}
    assert detect(torchvision_rcnn, "GeneralizedRCNN") == "torchvision"
    with pytest.raises(ValueError, match=r"not a RetinaNet checkpoint in any known format"):
        detect({"encoder.weight": torch.zeros(1)}, "RetinaNet")
