"""Published detector checkpoints by name: where to get them, which config reproduces them, and
the box AP their authors report on COCO val2017 (and mask or keypoint AP); for keypoint
detectors, the keypoints' names, left/right pairs and skeleton."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from detection.data.keypoints import (
    COCO_PERSON_KEYPOINT_NAMES,
    COCO_PERSON_SKELETON,
    flip_indices,
    flip_map_from_names,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_D2 = "https://dl.fbaipublicfiles.com/detectron2/COCO-Detection"


@dataclass(frozen=True)
class KeypointMetadata:
    """What a keypoint detector's K outputs mean: ``names[i]`` names keypoint i, ``flip_map``
    holds the (left, right) name pairs that a horizontal flip exchanges, ``skeleton`` the
    limbs as 0-based keypoint pairs (for drawing)."""

    names: Tuple[str, ...]
    flip_map: Tuple[Tuple[str, str], ...]
    skeleton: Tuple[Tuple[int, int], ...]

    @property
    def flip_indices(self) -> List[int]:
        """The permutation a horizontal flip applies (``detection.data.keypoints``)."""
        return flip_indices(self.names, self.flip_map)


COCO_PERSON_KEYPOINTS = KeypointMetadata(
    tuple(COCO_PERSON_KEYPOINT_NAMES), tuple(flip_map_from_names(COCO_PERSON_KEYPOINT_NAMES)),
    tuple(COCO_PERSON_SKELETON))


@dataclass(frozen=True)
class DetectorWeights:
    """A detector checkpoint: ``source`` is "torchvision" or "detectron2" (its file format),
    ``config`` the YAML (relative to ``configs/``) that matches its conventions."""

    name: str
    url: str
    source: str
    config: str
    box_ap: float
    sha256_prefix: Optional[str] = None  # torchvision files carry 8 hex digits of it
    mask_ap: Optional[float] = None  # Mask R-CNN (built when the config sets MODEL.MASK_ON)
    keypoint_ap: Optional[float] = None  # Keypoint R-CNN (MODEL.KEYPOINT_ON): OKS AP
    keypoints: Optional[KeypointMetadata] = None  # Keypoint R-CNN: its keypoints

    @property
    def config_path(self) -> Path:
        return CONFIGS / self.config


_ZOO: Dict[str, DetectorWeights] = {}


def _register(w: DetectorWeights) -> None:
    _ZOO[w.name] = w


_register(DetectorWeights(
    "torchvision/fasterrcnn_resnet50_fpn.coco_v1",
    "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
    "torchvision", "torchvision/fasterrcnn_resnet50_fpn.yaml", 37.0, "258fb6c6"))
_register(DetectorWeights(
    "torchvision/fasterrcnn_resnet50_fpn_v2.coco_v1",
    "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
    "torchvision", "torchvision/fasterrcnn_resnet50_fpn_v2.yaml", 46.7, "dd69338a"))
for _name, _path, _ap in (
    ("faster_rcnn_R_50_C4_1x", "137257644/model_final_721ade.pkl", 35.7),
    ("faster_rcnn_R_50_FPN_1x", "137257794/model_final_b275ba.pkl", 37.9),
    ("faster_rcnn_R_50_C4_3x", "137849393/model_final_f97cb7.pkl", 38.4),
    ("faster_rcnn_R_50_FPN_3x", "137849458/model_final_280758.pkl", 40.2),
    ("faster_rcnn_R_101_C4_3x", "138204752/model_final_298dad.pkl", 41.1),
    ("faster_rcnn_R_101_FPN_3x", "137851257/model_final_f6e8b1.pkl", 42.0),
):
    _register(DetectorWeights(f"detectron2/{_name}", f"{_D2}/{_name}/{_path}", "detectron2",
                              f"detectron2/{_name}.yaml", _ap))

_register(DetectorWeights(
    "torchvision/maskrcnn_resnet50_fpn.coco_v1",
    "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
    "torchvision", "torchvision/maskrcnn_resnet50_fpn.yaml", 37.9, "bf2d0c1e", mask_ap=34.6))
_register(DetectorWeights(
    "torchvision/maskrcnn_resnet50_fpn_v2.coco_v1",
    "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
    "torchvision", "torchvision/maskrcnn_resnet50_fpn_v2.yaml", 47.4, "73cbd019", mask_ap=41.8))
_register(DetectorWeights(
    "detectron2/mask_rcnn_R_50_FPN_3x",
    "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/"
    "137849600/model_final_f10217.pkl", "detectron2", "detectron2/mask_rcnn_R_50_FPN_3x.yaml",
    41.0, mask_ap=37.2))
for _name, _path, _ap, _mask_ap in (
    ("cascade_mask_rcnn_R_50_FPN_1x", "138602847/model_final_e9d89b.pkl", 42.1, 36.4),
    ("cascade_mask_rcnn_R_50_FPN_3x", "144998488/model_final_480dd8.pkl", 44.3, 38.5),
):
    _register(DetectorWeights(
        f"detectron2/{_name}", f"https://dl.fbaipublicfiles.com/detectron2/Misc/{_name}/{_path}",
        "detectron2", f"detectron2/{_name}.yaml", _ap, mask_ap=_mask_ap))

_register(DetectorWeights(
    "torchvision/keypointrcnn_resnet50_fpn.coco_v1",
    "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
    "torchvision", "torchvision/keypointrcnn_resnet50_fpn.yaml", 54.6, "fc266e95",
    keypoint_ap=65.0, keypoints=COCO_PERSON_KEYPOINTS))
for _name, _path, _ap, _kp_ap in (
    ("keypoint_rcnn_R_50_FPN_1x", "137261548/model_final_04e291.pkl", 53.6, 64.0),
    ("keypoint_rcnn_R_50_FPN_3x", "137849621/model_final_a6e10b.pkl", 55.4, 65.5),
):
    _register(DetectorWeights(
        f"detectron2/{_name}",
        f"https://dl.fbaipublicfiles.com/detectron2/COCO-Keypoints/{_name}/{_path}",
        "detectron2", f"detectron2/{_name}.yaml", _ap, keypoint_ap=_kp_ap,
        keypoints=COCO_PERSON_KEYPOINTS))

_register(DetectorWeights(
    "torchvision/retinanet_resnet50_fpn.coco_v1",
    "https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth",
    "torchvision", "torchvision/retinanet_resnet50_fpn.yaml", 36.4, "eeacb38b"))
_register(DetectorWeights(
    "torchvision/retinanet_resnet50_fpn_v2.coco_v1",
    "https://download.pytorch.org/models/retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
    "torchvision", "torchvision/retinanet_resnet50_fpn_v2.yaml", 41.5, "5905b1c5"))
_register(DetectorWeights(
    "torchvision/fcos_resnet50_fpn.coco_v1",
    "https://download.pytorch.org/models/fcos_resnet50_fpn_coco-99b0c9b7.pth",
    "torchvision", "torchvision/fcos_resnet50_fpn.yaml", 39.2, "99b0c9b7"))
for _name, _path, _ap in (
    ("retinanet_R_50_FPN_1x", "190397773/model_final_bfca0b.pkl", 37.4),
    ("retinanet_R_50_FPN_3x", "190397829/model_final_5bd44e.pkl", 38.7),
    ("retinanet_R_101_FPN_3x", "190397697/model_final_971ab9.pkl", 40.4),
):
    _register(DetectorWeights(f"detectron2/{_name}", f"{_D2}/{_name}/{_path}", "detectron2",
                              f"detectron2/{_name}.yaml", _ap))


def list_detector_weights() -> List[str]:
    return sorted(_ZOO)


def get_detector_weights(name: str) -> DetectorWeights:
    """The registered checkpoint ``name``; the error lists the valid names."""
    if name not in _ZOO:
        raise KeyError(f"unknown detector weights {name!r}; registered: "
                       f"{', '.join(list_detector_weights())}")
    return _ZOO[name]
