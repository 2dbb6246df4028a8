"""Every key of the defaults trees (detection's and segmentation's) is read by some code path,
or is on the documented compatibility list; and the configs agree with the weights they name.

Reads are recorded, not grepped: the config of each run is turned into a tree of
``RecordingCfgNode`` that notes every key read through it (``cfg.A.B``, ``cfg["A"]``,
``cfg.get("A")``); then every family trains for two iterations on a tiny shapes set (building
model, mapper, loader, optimizer, schedule, checkpointer, evaluator; periodic and final
evaluation), with the variants that take the other branches (C4, DC5, AdamW and cosine,
DeepLabV3 and FCN heads, gradient clipping, photometric augmentation, crops)."""

from __future__ import annotations

import pytest
import torch
from fvcore.common.config import CfgNode as _FvCfgNode

from detection.config import CfgNode
from detection.data.catalog import register_coco_instances
from detection.data.keypoints import COCO_PERSON_KEYPOINT_NAMES
from detection.data.shapes import ensure_shapes_dataset
from detection.defaults import KEYS_DECLARED_ABOVE, KEYS_KEPT_FOR_COMPATIBILITY
from detection.deploy.loading import load_for_evaluation
from detection.engine.train_net import train
from segmentation.config import get_cfg, load_config
from segmentation.panoptic import ensure_panoptic_shapes, register_coco_panoptic

READ: set[str] = set()


class RecordingCfgNode(CfgNode):
    """A config node that records the dotted name of every key read through it."""

    def _note(self, key: object) -> None:
        READ.add(f"{self.__dict__.get('_path', '')}{key}")

    def __getitem__(self, key):  # attribute reads come here too (CfgNode.__getattr__)
        value = super().__getitem__(key)
        self._note(key)
        return value

    def get(self, key, default=None):
        if key in self:
            self._note(key)
        return super().get(key, default)


def recording(node: _FvCfgNode, path: str = "") -> RecordingCfgNode:
    rec = RecordingCfgNode()
    rec.__dict__["_path"] = path
    for k, v in node.items():
        dict.__setitem__(rec, k, recording(v, f"{path}{k}.") if isinstance(v, _FvCfgNode)
                         else v)
    return rec


def leaf_keys(node: _FvCfgNode, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in node.items():
        keys |= leaf_keys(v, f"{prefix}{k}.") if isinstance(v, _FvCfgNode) else {prefix + k}
    return keys


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    p = ensure_shapes_dataset(root=tmp_path_factory.mktemp("shapes"), num_train=4, num_val=2,
                              image_size=(64, 96))
    pan = ensure_panoptic_shapes(root=tmp_path_factory.mktemp("panoptic"), num_train=4,
                                 num_val=2, image_size=(64, 96))  # for the panoptic run
    for split in ("train", "val"):
        register_coco_panoptic(f"keys_panoptic_{split}", getattr(pan, f"{split}_json"),
                               getattr(pan, f"{split}_images"), getattr(pan, f"{split}_panoptic"))
        register_coco_instances(f"keys_keypoint_{split}",
                                _with_keypoints(getattr(p, f"{split}_json"), tmp_path_factory),
                                getattr(p, f"{split}_images"))
    return f"{p.train_json}:{p.train_images}", f"{p.val_json}:{p.val_images}"


def _with_keypoints(json_file, tmp_path_factory):
    """The shapes json with COCO's 17 person keypoints on a line across each box (for the
    Keypoint R-CNN run)."""
    import json

    data = json.loads(open(json_file).read())
    for c in data["categories"]:
        c["keypoints"], c["skeleton"] = list(COCO_PERSON_KEYPOINT_NAMES), [[1, 2]]
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        a["keypoints"] = [v for i in range(17)
                          for v in (x + w * (i + 0.5) / 17, y + h / 2, 2)]
        a["num_keypoints"] = 17
    out = tmp_path_factory.mktemp("keypoints") / "instances.json"
    out.write_text(json.dumps(data))
    return str(out)


def _opts(shapes, out, **extra) -> list[str]:
    train_set, val_set = shapes
    opts = {
        "DATASETS.TRAIN": f"('{train_set}',)", "DATASETS.TEST": f"('{val_set}',)",
        "DATASETS.ROOT": str(out / "datasets"),
        "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.MAX_ITER": 2,
        "SOLVER.WARMUP_ITERS": 1, "SOLVER.CHECKPOINT_PERIOD": 1, "SOLVER.LOG_PERIOD": 1,
        "TEST.EVAL_PERIOD": 1, "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 96,
        "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 96, "MODEL.FPN.OUT_CHANNELS": 32,
        "MODEL.WEIGHTS": "", "MODEL.BACKBONE.WEIGHTS": "", "OUTPUT_DIR": str(out),
    }
    opts.update(extra)
    return [str(x) for kv in opts.items() for x in kv]


RUNS = {
    "faster_rcnn_fpn": ("faster_rcnn_r18_fpn_shapes.yaml", {
        "SOLVER.OPTIMIZER": "SGD", "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
        "SOLVER.STEPS": "(1,)", "SOLVER.CLIP_GRADIENTS.ENABLED": True,
        "INPUT.PHOTOMETRIC.ENABLED": True, "INPUT.PHOTOMETRIC.PROB": 1.0,
        "MODEL.ROI_BOX_HEAD.FC_DIM": 32, "MODEL.ROI_BOX_HEAD.NUM_CONV": 1,
        "MODEL.ROI_BOX_HEAD.CONV_DIM": 16}),
    "faster_rcnn_c4": ("faster_rcnn_r50_c4.yaml", {
        "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.ROI_HEADS.NUM_CLASSES": 4, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16,
        "MODEL.ANCHOR_GENERATOR.SIZES": "[[16, 32]]", "SOLVER.OPTIMIZER": "AdamW",
        "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineLR", "SOLVER.CLIP_GRADIENTS.ENABLED": False}),
    "faster_rcnn_dc5": ("faster_rcnn_r50_c4.yaml", {  # detectron2's DC5: res5 dilated, no FPN
        "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.OUT_FEATURES": "['res5']", "MODEL.RESNETS.RES5_DILATION": 2,
        "MODEL.RPN.IN_FEATURES": "['res5']", "MODEL.ROI_HEADS.IN_FEATURES": "['res5']",
        "MODEL.ROI_HEADS.NAME": "StandardROIHeads", "MODEL.ROI_HEADS.NUM_CLASSES": 4,
        "MODEL.ROI_BOX_HEAD.NUM_FC": 1, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7, "MODEL.ANCHOR_GENERATOR.SIZES": "[[16, 32]]"}),
    "retinanet": ("retinanet_r18_fpn_shapes.yaml", {
        "MODEL.RETINANET.NUM_CONVS": 1, "MODEL.RETINANET.LOSS_NORMALIZER": "per_image",
        "MODEL.RETINANET.MATCHER": "atss",  # the IoU matcher trains in test_retinanet.py
        "MODEL.FPN.OUT_CHANNELS": 64}),  # GroupNorm(32) on a 1x1 p7 needs 2 channels a group
    "fcos": ("fcos_r18_fpn_shapes.yaml", {
        "MODEL.FCOS.NUM_CONVS": 1, "MODEL.FPN.OUT_CHANNELS": 64}),
    "mask_rcnn": ("mask_rcnn_r18_fpn_shapes.yaml", {
        "MODEL.ROI_BOX_HEAD.FC_DIM": 32, "MODEL.ROI_MASK_HEAD.CONV_DIM": 8,
        "MODEL.ROI_MASK_HEAD.NUM_CONV": 1}),
    "cascade_mask_rcnn": ("mask_rcnn_r18_fpn_shapes.yaml", {
        "MODEL.ROI_HEADS.NAME": "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
        "MODEL.ROI_MASK_HEAD.CONV_DIM": 8, "MODEL.ROI_MASK_HEAD.NUM_CONV": 1}),
    "keypoint_rcnn": ("faster_rcnn_r18_fpn_shapes.yaml", {
        "DATASETS.TRAIN": "('keys_keypoint_train',)", "DATASETS.TEST": "('keys_keypoint_val',)",
        "MODEL.KEYPOINT_ON": True, "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS": "(8,)",
        "MODEL.ROI_BOX_HEAD.FC_DIM": 32}),
    "semantic_fpn": ("semantic_fpn_r18_shapes.yaml", {
        "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32, "INPUT.CROP.ENABLED": True,
        "INPUT.CROP.SIZE": "[48, 48]"}),
    "deeplabv3_aux": ("semantic_fpn_r18_shapes.yaml", {
        "MODEL.BACKBONE.NAME": "resnet", "MODEL.SEM_SEG_HEAD.NAME": "DeepLabV3Head",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES": "['res5']", "MODEL.SEM_SEG_HEAD.NORM": "BN",
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 16, "MODEL.SEM_SEG_HEAD.AUX_LOSS": True,
        "MODEL.RESNETS.RES4_DILATION": 2, "MODEL.RESNETS.RES5_DILATION": 4}),
    "fcn": ("semantic_fpn_r18_shapes.yaml", {
        "MODEL.BACKBONE.NAME": "resnet", "MODEL.SEM_SEG_HEAD.NAME": "FCNHead",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES": "['res5']", "MODEL.SEM_SEG_HEAD.NORM": "BN"}),
    "panoptic_fpn": ("panoptic_fpn_r18_shapes.yaml", {
        "DATASETS.TRAIN": "('keys_panoptic_train',)", "DATASETS.TEST": "('keys_panoptic_val',)",
        "MODEL.ROI_BOX_HEAD.FC_DIM": 32, "MODEL.ROI_MASK_HEAD.CONV_DIM": 8,
        "MODEL.ROI_MASK_HEAD.NUM_CONV": 1, "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32}),
}


@pytest.fixture(scope="module")
def keys_read(shapes, tmp_path_factory):
    READ.clear()
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (config, extra) in RUNS.items():
            out = tmp_path_factory.mktemp(name)
            cfg = recording(load_config(config, _opts(shapes, out, **extra)))
            _, results = train(cfg)
            assert results, name  # trained, checkpointed, evaluated
            if name == "faster_rcnn_fpn":  # --eval-only's loading (TEST.RUNTIME, PRECISION)
                cfg.MODEL.WEIGHTS = str(out / "model_final.pth")
                cfg.TEST.RETAIN_FREED_MEMORY = False  # a process setting: not in the tests'
                assert isinstance(load_for_evaluation(cfg), torch.nn.Module)
    finally:
        torch.set_num_threads(before)
    return set(READ)


@pytest.mark.slow
def test_every_default_key_is_read_or_kept_on_purpose(keys_read):
    every = leaf_keys(get_cfg())
    allowed = set(KEYS_KEPT_FOR_COMPATIBILITY)
    unread = sorted(every - keys_read - allowed)
    assert not unread, f"config keys that no code path reads: {unread}"
    assert allowed <= every, sorted(allowed - every)  # the list holds keys of the tree only


def test_the_recorder_sees_reads_through_attributes_items_get_and_clones():
    READ.clear()
    cfg = recording(get_cfg())
    rpn = cfg.MODEL.RPN
    _ = rpn.NMS_THRESH, cfg["SOLVER"]["BASE_LR"], cfg.INPUT.get("HFLIP_PROB")
    _ = cfg.clone().TEST.EVAL_ENGINE
    cfg.dump()  # writing the config out is not reading its keys
    leaves = READ & leaf_keys(cfg)
    assert leaves == {"MODEL.RPN.NMS_THRESH", "SOLVER.BASE_LR", "INPUT.HFLIP_PROB",
                      "TEST.EVAL_ENGINE"}


def test_segmentation_keys_are_the_ones_detection_points_to_segmentation_for():
    """detection names segmentation's keys in its error for them; the two lists agree."""
    from detection.config import get_cfg as detection_get_cfg

    added = leaf_keys(get_cfg()) - leaf_keys(detection_get_cfg())
    covered = {k for k in added
               if any(k == p or k.startswith(p + ".") for p in KEYS_DECLARED_ABOVE)}
    assert covered == added, sorted(added - covered)
    for prefix in KEYS_DECLARED_ABOVE:
        assert any(k == prefix or k.startswith(prefix + ".") for k in added), prefix


def test_configs_normalize_as_the_weights_they_name_expect():
    """Normalization has one owner, the config; every config naming registered backbone
    weights agrees with the registry's record of how those weights were trained."""
    from pathlib import Path

    from backbones import WEIGHTS

    configs = Path(__file__).resolve().parents[1] / "configs"
    checked = 0
    for path in sorted(configs.rglob("*.yaml")):
        cfg = load_config(path)
        spec = WEIGHTS.get(cfg.MODEL.BACKBONE.WEIGHTS)
        if spec is None:
            continue
        where = f"{path.name} ({spec.name})"
        assert cfg.MODEL.INPUT_FORMAT == spec.input_format, where
        assert cfg.MODEL.PIXEL_MEAN == pytest.approx(list(spec.pixel_mean)), where
        assert cfg.MODEL.PIXEL_STD == pytest.approx(list(spec.pixel_std)), where
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 == (spec.style == "caffe"), where
        checked += 1
    assert checked >= 10


def test_crop_type_other_than_absolute_is_refused():
    from detection.families import get_family

    cfg = load_config("semantic_fpn_r18_shapes.yaml", ["INPUT.CROP.TYPE", "relative"])
    with pytest.raises(ValueError, match="INPUT.CROP.TYPE must be 'absolute'"):
        get_family(cfg).build_mapper(cfg, True)
