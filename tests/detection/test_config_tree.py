"""One defaults tree per package: ``detection`` alone (``segmentation`` never imported) loads,
builds and runs every detection config in configs/ (boxes; Keypoint R-CNN configs, those with
``MODEL.KEYPOINT_ON``, keypoints too); a segmentation config loaded with
detection's tree is an error that says to use segmentation's config. Renamed keys name the key
that acts; configs naming registered backbone weights normalize as those weights expect."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detection.config import ConfigKeyError, get_cfg, load_config
from detection.defaults import KEYS_DECLARED_ABOVE, RENAMED_KEYS

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DETECTION_NAMES = ("faster_rcnn", "fasterrcnn", "Base-RCNN", "retinanet", "RetinaNet", "fcos",
                   "keypoint_rcnn", "keypointrcnn", "cascade_rcnn")
SEGMENTATION_NAMES = ("mask_rcnn", "maskrcnn", "semantic", "deeplab", "fcn", "panoptic")

# Runs in a fresh interpreter, so that nothing has imported segmentation.
_BUILD_EVERY_CONFIG = r"""
import json, sys
from pathlib import Path
import torch
from detection.config import ConfigKeyError, load_config
from detection.engine.loading import build_model_from_cfg

torch.set_num_threads(1)
configs = Path(sys.argv[1])
report = {}
for path in sorted(configs.rglob("*.yaml")):
    name = str(path.relative_to(configs))
    try:
        cfg = load_config(path, ["MODEL.WEIGHTS", "", "MODEL.BACKBONE.WEIGHTS", "",
                                 "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
                                 "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "10"])
    except ConfigKeyError as e:
        report[name] = {"error": str(e)}
        continue
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg).eval()
    with torch.no_grad():
        out = model([torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)])[0]
    k = model.num_classes
    report[name] = {"model": type(model).__name__, "outputs": sorted(out),
                    "boxes": list(out["boxes"].shape), "labels_ok": bool((out["labels"] < k).all()),
                    "num_keypoints": cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
                    if cfg.MODEL.KEYPOINT_ON else 0}
    if "keypoints" in out:
        report[name]["keypoints"] = list(out["keypoints"].shape)
        report[name]["keypoints_scores"] = list(out["keypoints_scores"].shape)
from detection.config import get_cfg
from detection.families import get_family
cfg = get_cfg()
cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
try:
    get_family(cfg)
except ValueError as e:
    report["family error"] = str(e)
report["segmentation imported"] = any(m.split(".")[0] == "segmentation" for m in sys.modules)
print(json.dumps(report))
"""


def _kind(name: str) -> str:
    det = any(k in name for k in DETECTION_NAMES)
    seg = any(k in name for k in SEGMENTATION_NAMES)
    assert det != seg, f"classify {name} as a detection or a segmentation config in this test"
    return "detection" if det else "segmentation"


@pytest.mark.slow
def test_detection_alone_builds_every_detection_config_and_refuses_segmentation_ones():
    res = subprocess.run([sys.executable, "-c", _BUILD_EVERY_CONFIG, str(CONFIGS)],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report.pop("segmentation imported") is False
    assert "`import segmentation` declares it" in report.pop("family error")
    names = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    assert sorted(report) == names
    detection = [n for n in names if _kind(n) == "detection"]
    segmentation = [n for n in names if _kind(n) == "segmentation"]
    # C4 and FPN, ours, torchvision's and detectron2's layouts; RetinaNet
    assert {"faster_rcnn_r50_c4.yaml", "faster_rcnn_r50_fpn.yaml",
            "torchvision/fasterrcnn_resnet50_fpn.yaml",
            "detectron2/faster_rcnn_R_50_C4_1x.yaml", "retinanet_r50_fpn.yaml",
            "torchvision/retinanet_resnet50_fpn_v2.yaml",
            "detectron2/retinanet_R_50_FPN_1x.yaml", "keypoint_rcnn_r50_fpn.yaml",
            "torchvision/keypointrcnn_resnet50_fpn.yaml",
            "detectron2/keypoint_rcnn_R_50_FPN_1x.yaml"} <= set(detection)
    for name in detection:
        r = report[name]
        assert "error" not in r, (name, r)
        family = "RetinaNet" if "etina" in name else "FCOS" if "fcos" in name else \
            "GeneralizedRCNN"
        assert r["model"] == family, name
        assert r["boxes"][1] == 4 and r["labels_ok"], (name, r)
        k = r["num_keypoints"]  # boxes only, or boxes and K keypoints each (KEYPOINT_ON)
        if k == 0:
            assert r["outputs"] == ["boxes", "labels", "scores"], (name, r)
        else:
            assert r["model"] == "GeneralizedRCNN", name
            assert r["outputs"] == ["boxes", "keypoints", "keypoints_scores", "labels",
                                    "scores"], (name, r)
            assert r["keypoints"] == [r["boxes"][0], k, 3], (name, r)
            assert r["keypoints_scores"] == [r["boxes"][0], k], (name, r)
    assert any(report[n]["num_keypoints"] == 17 for n in detection)
    assert len(segmentation) >= 5
    for name in segmentation:
        msg = report[name].get("error", "")
        assert "segmentation.config.load_config" in msg, (name, report[name])
        assert "(from " in msg and ".yaml)" in msg  # names the file that set the key


def test_segmentation_config_error_names_the_key_and_the_package():
    with pytest.raises(ConfigKeyError, match=r"MODEL\.MASK_ON.*`segmentation` package"):
        load_config("mask_rcnn_r18_fpn_shapes.yaml")
    with pytest.raises(ConfigKeyError, match=r"MODEL\.SEM_SEG_HEAD.*segmentation\.config"):
        load_config("semantic_fpn_r18_shapes.yaml")


def test_detection_tree_has_no_segmentation_keys():
    cfg = get_cfg()
    for prefix in KEYS_DECLARED_ABOVE:
        node = cfg
        parts = prefix.split(".")
        for part in parts[:-1]:
            node = node[part]
        assert parts[-1] not in node, prefix


def test_renamed_keys_name_the_key_that_acts():
    for old, new in RENAMED_KEYS.items():
        with pytest.raises(ConfigKeyError, match=f"'{old}'.*Use {new.split()[0]}"):
            load_config(None, [old, "1"])
    # TEST.DETECTIONS_PER_IMAGE did nothing; the key that acts does
    cfg = load_config(None, ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "7"])
    assert cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE == 7 and "DETECTIONS_PER_IMAGE" not in cfg.TEST
    # a misspelt key still gets the closest valid one
    with pytest.raises(ConfigKeyError, match="MODEL.RPN.NMS_THRESH"):
        load_config(None, ["MODEL.RPN.NMS_THRES", "0.5"])
