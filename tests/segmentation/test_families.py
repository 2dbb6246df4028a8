"""The model family table: one entry per family, declared by the package that owns it, used
by training and by ``load_model`` alike (our checkpoints of every family reload through it)."""

import pytest
import torch

import segmentation
from detection.families import FAMILIES, family_name, get_family
from segmentation.config import load_config


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_each_family_is_declared_once_by_its_package():
    assert FAMILIES["GeneralizedRCNN"] is FAMILIES["FasterRCNN"]
    assert FAMILIES["GeneralizedRCNN"].declared_by == "detection"
    assert FAMILIES["MaskRCNN"] is segmentation.mask_rcnn.MASK_RCNN
    assert FAMILIES["SemanticSegmentor"] is segmentation.semantic.SEMANTIC_SEGMENTOR
    assert FAMILIES["PanopticFPN"] is segmentation.panoptic.PANOPTIC_FPN
    assert FAMILIES["RetinaNet"].declared_by == "detection"
    assert {f.declared_by for f in FAMILIES.values()
            if f.name not in ("GeneralizedRCNN", "RetinaNet", "FCOS")} == {"segmentation"}
    cfg = load_config("mask_rcnn_r18_fpn_shapes.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
    assert family_name(cfg) == "MaskRCNN"  # detectron2's spelling of Mask R-CNN
    cfg.MODEL.MASK_ON = False
    assert get_family(cfg) is FAMILIES["GeneralizedRCNN"]
    cfg.MODEL.META_ARCHITECTURE = "CascadeRCNN"
    with pytest.raises(ValueError, match=r"'CascadeRCNN' is not a registered model family"):
        get_family(cfg)


@pytest.mark.parametrize("config,opts", [
    ("mask_rcnn_r18_fpn_shapes.yaml", ["MODEL.FPN.OUT_CHANNELS", "16",
                                       "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
                                       "MODEL.ROI_MASK_HEAD.CONV_DIM", "8"]),
    ("semantic_fpn_r18_shapes.yaml", ["MODEL.FPN.OUT_CHANNELS", "16",
                                      "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32"]),
    ("panoptic_fpn_r18_shapes.yaml", ["MODEL.FPN.OUT_CHANNELS", "16",
                                      "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
                                      "MODEL.ROI_MASK_HEAD.CONV_DIM", "8",
                                      "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
                                      "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", "1"]),
])
def test_load_model_reloads_our_checkpoint_of_each_family(config, opts, tmp_path):
    cfg = load_config(config, [*opts, "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"])
    family = get_family(cfg)
    torch.manual_seed(0)
    model = family.build(cfg).eval()
    names = [f"thing{i}" for i in range(model.metadata.num_classes)]
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "config": cfg.dump(),
                "metadata": {"class_names": names,
                             "category_ids": list(range(10, 10 + len(names)))}}, path)
    torch.manual_seed(1)  # a different initialisation: only the weights can make them equal
    (tmp_path / "config.yaml").write_text(cfg.dump())  # a YAML path, read with segmentation's tree
    loaded = segmentation.load_model(tmp_path / "config.yaml", str(path), optimize=False)
    assert type(loaded) is type(model)
    assert loaded.metadata.class_names == names and loaded.metadata.category_ids[0] == 10
    image = [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)]
    with torch.no_grad():
        want, got = model(image)[0], loaded(image)[0]
    assert set(want) == set(got)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, msg=k)


@pytest.mark.parametrize("config, head", [("retinanet_r18_fpn_shapes.yaml", "head"),
                                          ("panoptic_fpn_r18_shapes.yaml", "sem_seg_head")])
def test_analyze_model_counts_every_family(config, head, capsys):
    """``tools/analyze_model.py --config`` builds the config's family (not only Faster
    R-CNN) and counts each top-level part; the parts add up to the total."""
    import runpy
    from pathlib import Path

    tool = runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools" /
                              "analyze_model.py"))
    assert tool["main"](["--config", config, "--size", "96", "128"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        name, params, gflops = line.split()
        rows[name] = (int(params.replace(",", "")), float(gflops))
    assert rows[head][0] > 0 and rows[head][1] > 0
    parts = sum(v[1] for k, v in rows.items() if k != "total")
    assert 0.97 * rows["total"][1] <= parts <= rows["total"][1] + 1e-3


@pytest.mark.parametrize("config", [
    "faster_rcnn_r18_fpn_shapes.yaml", "faster_rcnn_r50_c4.yaml", "retinanet_r18_fpn_shapes.yaml",
    "fcos_r18_fpn_shapes.yaml", "mask_rcnn_r18_fpn_shapes.yaml", "panoptic_fpn_r18_shapes.yaml",
    "semantic_fpn_r18_shapes.yaml"])
def test_every_family_keeps_the_contract(config, tmp_path):
    """Each family's model provides what ``FamilyModel`` declares, with consistent values,
    and its weights load through the family the config names (a second model of the same
    config equals the first after loading its state)."""
    from detection.engine.loading import load_weights
    from detection.families import FamilyModel

    cfg = load_config(config, ["MODEL.BACKBONE.WEIGHTS", ""])
    torch.manual_seed(0)
    model = get_family(cfg).build(cfg)
    assert isinstance(model, FamilyModel), type(model).__name__
    assert model.num_classes == len(model.metadata.class_names) > 0
    assert isinstance(model.training_states(), dict)
    assert cfg.MODEL.META_ARCHITECTURE in ("GeneralizedRCNN", "RetinaNet", "FCOS", "PanopticFPN",
                                           "SemanticSegmentor")  # not rewritten by a builder
    path = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(1)
    other = get_family(cfg).build(cfg)
    load_weights(other, str(path), cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_config_named_parts_resolve_through_registries():
    """``MODEL.ROI_HEADS.NAME``, ``ROI_BOX_HEAD.NAME`` and ``RPN.HEAD_NAME`` name registered
    parts: one of the user's is used when named; an unknown name lists the known ones."""
    from torch import nn

    from detection.modeling.registry import ROI_BOX_HEADS, RPN_HEADS

    built = []

    @ROI_BOX_HEADS.register("TestOneFCHead")
    def one_fc(cfg, in_channels):
        r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        head = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * r * r, 32), nn.ReLU())
        head.out_dim = 32
        built.append(head)
        return head

    cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml",
                      ["MODEL.ROI_BOX_HEAD.NAME", "TestOneFCHead"])
    model = get_family(cfg).build(cfg).eval()
    assert model.roi_heads.box_head is built[0]
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128) * 255])[0]
    assert out["boxes"].shape[1] == 4
    for key, value, registry in (("MODEL.RPN.HEAD_NAME", "NoSuchHead", RPN_HEADS),
                                 ("MODEL.ROI_HEADS.NAME", "NoSuchHeads", None),
                                 ("MODEL.ROI_BOX_HEAD.NAME", "NoSuchBoxHead", ROI_BOX_HEADS)):
        bad = load_config("faster_rcnn_r18_fpn_shapes.yaml", [key, value])
        with pytest.raises(ValueError, match=rf"unknown {key} '{value}'; registered: \[") as e:
            get_family(bad).build(bad)
        if registry is not None:
            assert all(name in str(e.value) for name in registry.names())
