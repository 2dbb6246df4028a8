"""FCOS: parity with torchvision's ``fcos_resnet50_fpn`` (its random model with calibrated
normalization statistics, converted by our loader, in float64: the same points, the same
detections and the same three losses); torchvision's and detectron2's checkpoint names load
with every key used, wrong keys and other families' checkpoints are errors naming them; the
point labelling on a hand-made example; the model trains through the family table and the
engine; ``optimize_for_inference`` keeps its detections."""

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn

from backbones.machine import parse_cpuinfo, simulate_cpu
from detection.config import get_cfg, load_config
from detection.data.shapes import ensure_shapes_dataset
from detection.engine.train_net import train
from detection.families import FamilyModel, get_family
from detection.modeling.box_ops import LinearBoxCoder
from detection.modeling.build import build_fcos
from detection.modeling.calibration import calibrate_batchnorm, textured_image
from detection.modeling.convert import load_state_dict
from detection.modeling.fcos import FCOS
from detection.modeling.fcos_convert import detect_format, detectron2_to_ours, to_ours
from detection.modeling.predictor import load_model, predict
from detection.modeling.zoo import get_detector_weights
from detection.optimize import optimize_for_inference

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MIN_SIZE, MAX_SIZE = 192, 320
SIZES = ((203, 301), (250, 187))  # odd sizes, both orientations


def _cfg(path: str, *opts: str):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / path))
    cfg.merge_from_list(["MODEL.BACKBONE.WEIGHTS", "", "MODEL.WEIGHTS", "", *opts])
    return cfg


# ----------------------------------------------------------------- parity with torchvision


def _images():
    gen = torch.Generator().manual_seed(0)
    return [textured_image(h, w, noise=0.15, generator=gen) for h, w in SIZES]


@pytest.fixture(scope="module")
def reference():
    """torchvision's model, random, with towers lively enough (random conv biases and
    GroupNorm affines, which the converter must carry) that tens of detections per image
    pass 0.2, and the background logit (class 0) silenced, as training leaves it."""
    torch.manual_seed(0)
    ref = fcos_resnet50_fpn(weights=None, weights_backbone=None, min_size=MIN_SIZE,
                            max_size=MAX_SIZE).eval()
    head = ref.head
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.Conv2d):  # variance-preserving towers
                torch.nn.init.normal_(m.weight, std=(2 / (m.in_channels * 9)) ** 0.5)
                m.bias.normal_(0, 0.1, generator=gen)
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.8, 1.2, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
        calibrate_batchnorm(ref, lambda: ref([i / 255 for i in _images()]))
        reg = head.regression_head.bbox_reg
        ctr = head.regression_head.bbox_ctrness
        cls = head.classification_head.cls_logits
        torch.nn.init.normal_(reg.weight, std=0.01)  # distances of about one square
        reg.bias.fill_(1.0)
        torch.nn.init.normal_(ctr.weight, std=0.02)
        ctr.bias.zero_()
        torch.nn.init.normal_(cls.weight, std=0.024)
        cls.bias.fill_(-5.5)
        cls.bias[0] = -30.0
    return ref


def _ours(ref) -> FCOS:
    cfg = load_config(str(CONFIGS / "torchvision" / "fcos_resnet50_fpn.yaml"), [
        "MODEL.BACKBONE.WEIGHTS", "", "MODEL.WEIGHTS", "",
        "INPUT.MIN_SIZE_TEST", str(MIN_SIZE), "INPUT.MAX_SIZE_TEST", str(MAX_SIZE),
        "INPUT.MIN_SIZE_TRAIN", f"({MIN_SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(MAX_SIZE),
        "INPUT.RESIZE_IN_MODEL_TRAIN", "True",
    ])
    model = build_fcos(cfg).eval()
    load_state_dict(model, to_ours(ref.state_dict()))
    return model


def test_torchvision_parity(reference):
    ref, ours = reference.double(), _ours(reference).double()
    imgs = _images()
    points = {}
    hooks = [ref.anchor_generator.register_forward_hook(
                 lambda m, i, out: points.update(ref=out)),
             ours.points.register_forward_hook(lambda m, i, out: points.update(ours=out))]
    with torch.no_grad():
        expected = ref([i.double() / 255 for i in imgs])
        got = ours([i.double() for i in imgs])
    for h in hooks:
        h.remove()
    for ref_points in points["ref"]:  # torchvision: per image, all levels concatenated
        assert torch.equal(ref_points, torch.cat(points["ours"]))
    box_diff = score_diff = 0.0
    for e, g in zip(expected, got):
        assert 20 <= e["boxes"].shape[0] < 100, "the reference must return tens of detections"
        assert (e["labels"] > 0).all()
        assert e["boxes"].shape == g["boxes"].shape
        # the same order (by score), boxes, scores and labels
        assert torch.equal(e["labels"], g["labels"] + 1)
        box_diff = max(box_diff, float((e["boxes"] - g["boxes"]).abs().max()))
        score_diff = max(score_diff, float((e["scores"] - g["scores"]).abs().max()))
    print(f"detections {[e['boxes'].shape[0] for e in expected]}: max |box diff| "
          f"{box_diff:.1e} px, max |score diff| {score_diff:.1e}")
    # torchvision maps boxes back to the input with float32 ratios: a few 1e-6 px
    assert box_diff < 1e-4 and score_diff < 1e-9

    # training mode (BatchNorm in eval mode: torchvision's random model has it, our config
    # FrozenBN), the same targets: the same three losses
    ref.train()
    ours.train()
    for m in ref.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    boxes = [torch.tensor([[20.0, 30, 120, 110], [150, 40, 290, 190], [60, 60, 90, 200]]),
             torch.tensor([[10.0, 10, 170, 240], [100, 120, 140, 160], [0, 0, 30, 25]])]
    labels = [torch.tensor([1, 17, 90]), torch.tensor([5, 1, 33])]
    with torch.no_grad():
        want = ref([i.double() / 255 for i in imgs],
                   [{"boxes": b.double(), "labels": lab} for b, lab in zip(boxes, labels)])
        losses = ours([i.double() for i in imgs],
                      [{"boxes": b.double(), "labels": lab - 1} for b, lab in zip(boxes, labels)])
    print(f"losses: torchvision {({k: v.item() for k, v in want.items()})}, "
          f"ours {({k: v.item() for k, v in losses.items()})}")
    pairs = {"loss_cls": "classification", "loss_box_reg": "bbox_regression",
             "loss_centerness": "bbox_ctrness"}
    # torchvision resizes the targets with float32 ratios: 1e-8 relative apart in float64
    for name, theirs in pairs.items():
        assert float(losses[name]) > 0, name
        torch.testing.assert_close(losses[name], want[theirs], rtol=1e-6, atol=0, msg=name)
    ref.eval()
    ours.eval()


def test_point_labelling_by_hand():
    """Two levels of squares 8 (a 4x4 grid of centres 0..24) and 16 (2x2, centres 0, 16) on a
    32-pixel image. Box A [0, 0, 12, 12] (label 3) strictly holds one level-0 centre, (8, 8);
    (0, 0), (8, 0) and (0, 8) lie on its edges. Box B [4, 4, 30, 30] (label 2) holds the nine
    centres (8..24, 8..24), all within 1.5 x 8 of its centre (17, 17), all with a reach below
    8 x 8 = 64. (8, 8) goes to A, the smaller box. Level 1 needs a reach above 4 x 16 = 64:
    nothing. An image without boxes is all background."""
    cfg = _cfg("fcos_r18_fpn_shapes.yaml")
    model = build_fcos(cfg)
    ys, xs = torch.meshgrid(torch.arange(4.0) * 8, torch.arange(4.0) * 8, indexing="ij")
    c0 = torch.stack([xs.flatten(), ys.flatten()], 1)
    ys, xs = torch.meshgrid(torch.arange(2.0) * 16, torch.arange(2.0) * 16, indexing="ij")
    c1 = torch.stack([xs.flatten(), ys.flatten()], 1)
    points = torch.cat([torch.cat([c0 - 4, c0 + 4], 1), torch.cat([c1 - 8, c1 + 8], 1)])
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 30], [0, 0, 12, 12]]),
                "labels": torch.tensor([2, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    labels, matched = model.label_points(points, [16, 4], targets)
    k = model.num_classes
    want = torch.full((20,), k)
    want[[6, 7, 9, 10, 11, 13, 14, 15]] = 2  # B
    want[5] = 3  # (8, 8): both boxes hold it, A is smaller
    assert labels[0].tolist() == want.tolist()
    assert torch.equal(matched[0, 5], targets[0]["boxes"][1])
    assert (labels[1] == k).all()


# ----------------------------------------------------------------- checkpoints


def _detectron2_names(ours: dict) -> dict:
    """Our FCOS state dict under detectron2's names (meta_arch/fcos.py)."""
    out = {}
    for key, value in ours.items():
        new = key.replace("stem.bn1.", "stem.conv1.norm.")
        for j in (1, 2, 3):
            new = new.replace(f".bn{j}.", f".conv{j}.norm.")
        new = new.replace(".downsample.1.", ".shortcut.norm.")
        new = new.replace(".downsample.0.", ".shortcut.")
        for i in range(3):
            new = new.replace(f"backbone.lateral_convs.{i}.conv.", f"backbone.fpn_lateral{i + 3}.")
            new = new.replace(f"backbone.output_convs.{i}.conv.", f"backbone.fpn_output{i + 3}.")
        for ours_tower, theirs in (("cls_convs", "cls_subnet"), ("box_convs", "bbox_subnet")):
            for i in range(4):  # Sequential(conv, GroupNorm, ReLU) x 4
                new = new.replace(f"head.{ours_tower}.{i}.conv.", f"head.{theirs}.{3 * i}.")
                new = new.replace(f"head.{ours_tower}.{i}.norm.", f"head.{theirs}.{3 * i + 1}.")
        out[new] = value
    return out


def test_detectron2_checkpoint_loads_every_key():
    torch.manual_seed(0)
    source = build_fcos(_cfg("fcos_r50_fpn.yaml"))
    sd = {k: torch.randn(v.shape) for k, v in source.state_dict().items()}
    d2 = _detectron2_names(sd)
    assert "head.cls_subnet.9.bias" in d2 and "backbone.fpn_output5.weight" in d2
    assert "backbone.bottom_up.res3.0.shortcut.norm.running_var" in d2
    ckpt = {"model": {**d2, "pixel_mean": torch.zeros(3, 1, 1)}, "__author__": "synthetic"}
    assert detect_format(ckpt) == "detectron2"
    converted = to_ours(ckpt)
    assert converted.keys() == sd.keys()  # every key used, nothing left over
    assert detectron2_to_ours(d2).keys() == sd.keys()  # a bare state dict too
    model = build_fcos(_cfg("fcos_r50_fpn.yaml"))
    load_state_dict(model, converted)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    assert model.backbone.top_block.in_feature == "p5"  # P6 from P5, as both peers

    wrong = dict(d2)
    wrong["head.ctrness_extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="head.ctrness_extra.weight"):
        to_ours({"model": wrong})
    misshapen = dict(d2)
    misshapen["head.cls_score.weight"] = torch.zeros(20, 256, 3, 3)
    misshapen["head.cls_score.bias"] = torch.zeros(20)
    with pytest.raises(ValueError, match=r"head\.cls_score\.weight.*\(20, 256, 3, 3\).*"
                                         r"\(80, 256, 3, 3\)"):
        load_state_dict(model, to_ours({"model": misshapen}))


def test_torchvision_names_convert_and_other_families_are_refused(tmp_path):
    tv = fcos_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    assert detect_format(tv) == "torchvision"
    ours = to_ours(tv)
    assert len(ours) == len(tv)
    assert torch.equal(ours["head.cls_score.weight"], tv["head.classification_head.cls_logits."
                                                         "weight"][1:])
    assert torch.equal(ours["head.box_convs.3.norm.bias"], tv["head.regression_head.conv.10.bias"])
    assert torch.equal(ours["head.cls_convs.1.conv.bias"],
                       tv["head.classification_head.conv.3.bias"])
    assert detect_format(ours) == "ours"
    with pytest.raises(KeyError, match="head.regression_head.scale"):
        to_ours({**tv, "head.regression_head.scale.weight": torch.zeros(1)})

    retinanet = {"head.cls_subnet.0.weight": torch.zeros(1),
                 "head.bbox_subnet.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"a RetinaNet checkpoint.*not a FCOS one"):
        detect_format(retinanet)
    from detection.modeling.retinanet_convert import detect_format as retinanet_format

    with pytest.raises(ValueError, match=r"a FCOS checkpoint \(key "
                                         r"'head.regression_head.bbox_ctrness.weight'\)"):
        retinanet_format(tv)
    # through the family's loader, the error names the file
    path = tmp_path / "retinanet.pth"
    torch.save({"model": retinanet}, path)
    cfg = _cfg("fcos_r18_fpn_shapes.yaml")
    family = get_family(cfg)
    assert family.name == "FCOS"
    with pytest.raises(ValueError, match=f"{path}.*not a FCOS"):
        family.load_weights(family.build(cfg), str(path))
    w = get_detector_weights("torchvision/fcos_resnet50_fpn.coco_v1")
    assert w.box_ap == 39.2 and load_config(w.config).MODEL.META_ARCHITECTURE == "FCOS"


def test_linear_box_coder_round_trip():
    coder = LinearBoxCoder()
    squares = torch.tensor([[0.0, 0, 8, 8], [16, 16, 48, 48]])
    boxes = torch.tensor([[1.0, 2, 9, 30], [10, 20, 100, 40]])
    ltrb = coder.encode(boxes, squares)
    assert torch.allclose(ltrb[0], torch.tensor([3.0, 2, 5, 26]) / 8)
    assert torch.allclose(coder.decode(ltrb, squares), boxes)


# ----------------------------------------------------------------- the model


def _tiny(*opts: str) -> FCOS:
    torch.manual_seed(0)
    return build_fcos(_cfg("fcos_r18_fpn_shapes.yaml", "MODEL.FPN.OUT_CHANNELS", "64",
                           "MODEL.FCOS.NUM_CONVS", "1", *opts))


def _images_uint8():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 120, 150), generator=gen, dtype=torch.uint8),
            torch.randint(0, 256, (3, 97, 131), generator=gen, dtype=torch.uint8)]


def test_losses_reach_every_trainable_part_and_empty_images_train():
    model = _tiny().train()
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 70], [40, 30, 110, 90]]),
                "labels": torch.tensor([0, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(_images_uint8(), targets)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_centerness"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model(_images_uint8(), empty)
    assert float(losses["loss_box_reg"].detach()) == 0 and float(losses["loss_cls"].detach()) > 0


def test_optimized_model_keeps_the_detections():
    model = _tiny("MODEL.FCOS.SCORE_THRESH_TEST", "0.05").eval()
    imgs = _images_uint8()
    with torch.no_grad():
        calibrate_batchnorm(model, lambda: model(imgs))
        model.head.cls_score.bias.fill_(-2.0)
        torch.nn.init.normal_(model.head.cls_score.weight, std=0.05)
        model.head.bbox_pred.bias.fill_(1.0)
        expected = model(imgs)
        got = optimize_for_inference(model)(imgs)
    for e, g, img in zip(expected, got, imgs):
        assert e["boxes"].shape[0] > 10
        assert e["boxes"][:, 2].max() <= img.shape[2] and e["boxes"][:, 3].max() <= img.shape[1]
        assert e["boxes"].shape == g["boxes"].shape
        assert torch.allclose(e["boxes"], g["boxes"], atol=1e-2)
        assert torch.allclose(e["scores"], g["scores"], atol=1e-4)
        assert torch.equal(e["labels"], g["labels"])
    assert model.head.bbox_pred.fused_relu  # the distances' ReLU inside the conv

    # bf16: the backbone alone, as the class declares (bf16_split)
    cpuinfo = Path(__file__).resolve().parents[1] / "backbones" / "data" / \
        "cpuinfo_intel_xeon_sapphire_rapids_amx.txt"
    with simulate_cpu(parse_cpuinfo(cpuinfo.read_text())):
        bf16 = optimize_for_inference(_tiny(), precision="bf16")
    for name, p in bf16.named_parameters():
        assert (p.dtype == torch.bfloat16) == name.startswith("backbone."), name


@pytest.mark.parametrize("key, value, message", [
    ("MODEL.FCOS.TOP_BLOCK_IN", "p4", "TOP_BLOCK_IN must be 'c5' or 'p5'"),
    ("MODEL.FCOS.IN_FEATURES", "['p2', 'p3']", r"IN_FEATURES \['p2'\] are not outputs"),
    ("MODEL.FCOS.BOX_REG_LOSS", "smooth_l1", "BOX_REG_LOSS must be one of"),
])
def test_bad_config_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_fcos(_cfg("fcos_r18_fpn_shapes.yaml", key, value))


# ----------------------------------------------------------------- the engine


def test_trains_through_the_family_table(tmp_path):
    """``train`` (what tools/train_det.py runs) picks FCOS from MODEL.META_ARCHITECTURE,
    trains a few iterations on the shapes set, evaluates and saves a checkpoint that the
    family loads back."""
    p = ensure_shapes_dataset(root=tmp_path / "shapes", num_train=8, num_val=2,
                              image_size=(96, 128))
    train_set = f"{p.train_json}:{p.train_images}"
    opts = {
        "DATASETS.TRAIN": f"('{train_set}',)", "DATASETS.TEST": f"('{train_set}',)",
        "DATASETS.ROOT": str(tmp_path / "datasets"), "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.IMS_PER_BATCH": 2, "SOLVER.MAX_ITER": 4, "SOLVER.WARMUP_ITERS": 2,
        "SOLVER.CHECKPOINT_PERIOD": 1000, "TEST.EVAL_PERIOD": 0,
        "INPUT.MIN_SIZE_TRAIN": "(96,)", "INPUT.MAX_SIZE_TRAIN": 128,
        "INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 128, "MODEL.FPN.OUT_CHANNELS": 64,
        "MODEL.FCOS.NUM_CONVS": 1, "MODEL.WEIGHTS": "", "OUTPUT_DIR": str(tmp_path / "run"),
    }
    cfg = load_config("fcos_r18_fpn_shapes.yaml", [str(x) for kv in opts.items() for x in kv])
    torch.manual_seed(0)
    model, results = train(cfg)
    assert isinstance(model, FCOS)
    assert "AP" in results["bbox"]
    weights = tmp_path / "run" / "model_final.pth"
    assert weights.is_file()
    family = get_family(cfg)
    torch.manual_seed(1)
    loaded = family.build(cfg)
    family.load_weights(loaded, str(weights))
    assert torch.equal(loaded.head.ctrness.weight, model.head.ctrness.weight)
    assert loaded.metadata.class_names == model.metadata.class_names
    assert isinstance(loaded, FamilyModel) and loaded.training_states() == {}
    predictor = load_model(str(tmp_path / "run" / "config.yaml"), str(weights))
    det = predict(predictor, next(Path(p.train_images).iterdir()))
    assert det["boxes"].shape[1] == 4 and len(det["class_names"]) == det["boxes"].shape[0]
