"""Model families: the one table that ``MODEL.META_ARCHITECTURE`` names.

A family says how to build its model from a config, how to read weights into it, which data
mapper feeds it, which evaluator scores it and how the training dataset's class metadata enters
the config. Training (:func:`detection.engine.train_net.train`), evaluation and
:func:`detection.modeling.predictor.load_model` all look the family up here, so they can never
disagree about which model a config means.

Each family is declared by the package that owns it, in one visible place:

- ``GeneralizedRCNN`` (alias ``FasterRCNN``): Faster R-CNN, FPN and C4, declared here
  (:data:`FASTER_RCNN`); with detectron2's ``MODEL.KEYPOINT_ON: True``, Keypoint R-CNN (the
  same family: its builder adds the keypoint head, its loader maps the head's names, its
  mapper makes keypoint targets and its evaluator adds keypoint AP).
- ``RetinaNet``: RetinaNet (one stage, focal loss on P3-P7), declared here
  (:data:`RETINANET`).
- ``FCOS``: FCOS (one stage, anchor-free, points with centerness on P3-P7), declared here
  (:data:`FCOS`).
- ``MaskRCNN``: Mask R-CNN, declared in ``segmentation/mask_rcnn/family.py``; detectron2's
  spelling, ``GeneralizedRCNN`` with ``MODEL.MASK_ON: True``, means it too.
- ``SemanticSegmentor``: Semantic FPN, DeepLabV3 and FCN, declared in
  ``segmentation/semantic/family.py``.
- ``PanopticFPN``: Panoptic FPN, declared in ``segmentation/panoptic/family.py``.

A package above detection registers its families when it is imported (``import segmentation``);
its config keys come from its own ``get_cfg()`` (``segmentation.config``), not from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = [
    "FAMILIES",
    "FamilyModel",
    "FASTER_RCNN",
    "FCOS",
    "RETINANET",
    "ModelFamily",
    "attach_instance_metadata",
    "coco_evaluator",
    "family_name",
    "get_family",
    "register_family",
    "strict_weight_loader",
]

logger = logging.getLogger(__name__)

StateDict = Dict[str, Tensor]


@runtime_checkable
class FamilyModel(Protocol):
    """What a model of every family provides (a test checks each registered family):

    - ``metadata``: what its outputs mean (``detection.modeling.metadata.Metadata``: class
      names and dataset category ids; a panoptic model's stuff names too); checkpoints carry
      ``metadata.to_dict()``;
    - ``num_classes``: the classes it predicts;
    - ``training_states()``: name -> object with ``state_dict`` / ``load_state_dict`` to save
      in training checkpoints besides the weights (RetinaNet's running foreground count), {}
      for most.

    Its weights load through its family's ``load_weights``, found from the config
    (``MODEL.META_ARCHITECTURE``), never from the model's class name. Inference
    optimizations are optional (``optimize_for_inference(precision=...)``)."""

    metadata: Any

    @property
    def num_classes(self) -> int: ...

    def training_states(self) -> Dict[str, Any]: ...


@dataclass(frozen=True)
class ModelFamily:
    """What the engine and ``load_model`` need to know about one model family.

    Attributes:
        name: the ``MODEL.META_ARCHITECTURE`` value (and the model's class name).
        build: ``cfg -> model`` with random heads (ImageNet backbone weights when
            ``MODEL.BACKBONE.WEIGHTS`` names them), on ``MODEL.DEVICE``.
        load_weights: ``(model, MODEL.WEIGHTS) -> checkpoint`` loads a zoo name, URL or path (ours
            or a peer's format) into the built model; returns the checkpoint dict it read.
        build_mapper: ``(cfg, is_train) -> mapper`` of dataset records to model inputs.
        build_evaluator: ``(cfg, dataset_name, output_dir) -> evaluator`` (``reset``,
            ``process(inputs, outputs)``, ``evaluate() -> {task: {metric: value}}``).
        attach_metadata: ``cfg -> None``: class names and ids of ``DATASETS.TRAIN[0]`` into
            ``cfg.MODEL`` (so checkpoints carry them), checking the class count.
        declared_by: the package that declares the family (named in errors).
    """

    name: str
    build: Callable[[Any], nn.Module]
    load_weights: Callable[[nn.Module, str], Mapping[str, Any]]
    build_mapper: Callable[[Any, bool], Any]
    build_evaluator: Callable[[Any, str, Optional[Path]], Any]
    attach_metadata: Callable[[Any], None]
    declared_by: str = "detection"


# MODEL.META_ARCHITECTURE -> family.
FAMILIES: Dict[str, ModelFamily] = {}

# Families that packages above detection declare, so that a config naming one says which
# package to import.
_DECLARED_ABOVE = {"MaskRCNN": "segmentation", "SemanticSegmentor": "segmentation",
                   "PanopticFPN": "segmentation"}


def register_family(family: ModelFamily, *aliases: str) -> ModelFamily:
    """Make ``MODEL.META_ARCHITECTURE: family.name`` (and each alias) mean ``family``."""
    for name in (family.name, *aliases):
        FAMILIES[name] = family
    return family


def family_name(cfg: Any) -> str:
    """The family ``cfg`` describes: ``MODEL.META_ARCHITECTURE``, where detectron2's
    ``GeneralizedRCNN`` with ``MODEL.MASK_ON`` means ``MaskRCNN``."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name in ("GeneralizedRCNN", "FasterRCNN") and cfg.MODEL.get("MASK_ON", False):
        return "MaskRCNN"
    return name


def get_family(cfg: Any) -> ModelFamily:
    """The registered family of ``cfg``; a ValueError names the registered ones otherwise."""
    name = family_name(cfg)
    if name in FAMILIES:
        return FAMILIES[name]
    hint = ""
    if name in _DECLARED_ABOVE:
        hint = f" `import {_DECLARED_ABOVE[name]}` declares it."
    raise ValueError(f"MODEL.META_ARCHITECTURE {name!r} is not a registered model family; "
                     f"registered: {sorted(FAMILIES)}.{hint}")


def strict_weight_loader(
    convert: Callable[[Mapping[str, Any]], StateDict],
) -> Callable[[nn.Module, str], Mapping[str, Any]]:
    """A ``load_weights`` that reads a checkpoint (zoo name, URL or path), converts it with
    ``convert`` and loads it exactly: every parameter given, every key used; errors name the
    weights, the key and both shapes."""

    def load(model: nn.Module, weights: str) -> Mapping[str, Any]:
        from detection.modeling.convert import load_state_dict
        from detection.modeling.predictor import read_weights

        ckpt = read_weights(weights)
        try:
            load_state_dict(model, convert(ckpt))
        except (KeyError, ValueError) as e:
            raise type(e)(f"{weights}: {e}") from e
        logger.info("Loaded weights from %s", weights)
        return ckpt

    return load


# ----------------------------------------------------------------- detection's own family


def _build_faster_rcnn(cfg: Any) -> nn.Module:
    from detection.modeling.build import build_model

    return build_model(cfg)


def _convert_detector(checkpoint: Mapping[str, Any]) -> StateDict:
    from detection.modeling.convert import to_ours

    return to_ours(checkpoint)


def _detection_mapper(cfg: Any, is_train: bool) -> Any:
    from detection.data.mapper import DatasetMapper

    return DatasetMapper.from_config(cfg, is_train=is_train)


def coco_evaluator(*tasks: str) -> Callable[[Any, str, Optional[Path]], Any]:
    """A ``build_evaluator`` for COCO AP of ``tasks`` ("bbox", "segm")."""

    def build(cfg: Any, dataset_name: str, output_dir: Optional[Path] = None) -> Any:
        from detection.evaluation.coco_evaluation import COCOEvaluator

        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_dir,
                             engine=cfg.TEST.EVAL_ENGINE)

    return build


def attach_instance_metadata(cfg: Any,
                             num_classes_key: str = "MODEL.ROI_HEADS.NUM_CLASSES") -> None:
    """``MODEL.CLASS_NAMES`` / ``CATEGORY_IDS`` from the training dataset's ``thing_classes``,
    checked against the class count at ``num_classes_key``. Leaves a config that names its
    classes."""
    from detection.data.catalog import get_metadata

    if cfg.MODEL.CLASS_NAMES or not cfg.DATASETS.TRAIN:
        return
    meta = get_metadata(cfg.DATASETS.TRAIN[0])
    names = list(meta.get("thing_classes", []))
    if not names:
        return
    ids = [int(i) for i in meta.get("contiguous_id_to_dataset_id", range(len(names)))]
    num_classes = cfg
    for part in num_classes_key.split("."):
        num_classes = num_classes[part]
    if num_classes != len(names):
        raise ValueError(
            f"{num_classes_key} is {num_classes} but dataset "
            f"{cfg.DATASETS.TRAIN[0]!r} has {len(names)} categories; set it to {len(names)}"
        )
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.CLASS_NAMES = names
    cfg.MODEL.CATEGORY_IDS = ids
    if was_frozen:
        cfg.freeze()


def _rcnn_evaluator(cfg: Any, dataset_name: str, output_dir: Optional[Path] = None) -> Any:
    """COCO box AP; with ``MODEL.KEYPOINT_ON``, keypoint (OKS) AP too, with the dataset's
    ``keypoint_oks_sigmas`` metadata when it has them."""
    if not cfg.MODEL.get("KEYPOINT_ON", False):
        return coco_evaluator("bbox")(cfg, dataset_name, output_dir)
    from detection.data.catalog import get_metadata
    from detection.evaluation.coco_evaluation import COCOEvaluator

    # the dataset's per-keypoint OKS sigmas; without, pycocotools' (COCO's 17 person keypoints)
    meta = get_metadata(dataset_name) if isinstance(dataset_name, str) else dataset_name[1]
    sigmas = (meta or {}).get("keypoint_oks_sigmas")
    return COCOEvaluator(dataset_name, tasks=("bbox", "keypoints"), output_dir=output_dir,
                         engine=cfg.TEST.EVAL_ENGINE, kpt_oks_sigmas=sigmas)


FASTER_RCNN = register_family(
    ModelFamily(
        name="GeneralizedRCNN",
        build=_build_faster_rcnn,
        load_weights=strict_weight_loader(_convert_detector),
        build_mapper=_detection_mapper,
        build_evaluator=_rcnn_evaluator,
        attach_metadata=attach_instance_metadata,
    ),
    "FasterRCNN",
)


# ----------------------------------------------------------------- RetinaNet


def _build_retinanet(cfg: Any) -> nn.Module:
    from detection.modeling.build import build_retinanet

    return build_retinanet(cfg)


def _convert_retinanet(checkpoint: Mapping[str, Any]) -> StateDict:
    from detection.modeling.retinanet_convert import to_ours

    return to_ours(checkpoint)


def _attach_retinanet_metadata(cfg: Any) -> None:
    attach_instance_metadata(cfg, "MODEL.RETINANET.NUM_CLASSES")


RETINANET = register_family(
    ModelFamily(
        name="RetinaNet",
        build=_build_retinanet,
        load_weights=strict_weight_loader(_convert_retinanet),
        build_mapper=_detection_mapper,
        build_evaluator=coco_evaluator("bbox"),
        attach_metadata=_attach_retinanet_metadata,
    )
)


# ----------------------------------------------------------------- FCOS


def _build_fcos(cfg: Any) -> nn.Module:
    from detection.modeling.build import build_fcos

    return build_fcos(cfg)


def _convert_fcos(checkpoint: Mapping[str, Any]) -> StateDict:
    from detection.modeling.fcos_convert import to_ours

    return to_ours(checkpoint)


def _attach_fcos_metadata(cfg: Any) -> None:
    attach_instance_metadata(cfg, "MODEL.FCOS.NUM_CLASSES")


FCOS = register_family(
    ModelFamily(
        name="FCOS",
        build=_build_fcos,
        load_weights=strict_weight_loader(_convert_fcos),
        build_mapper=_detection_mapper,
        build_evaluator=coco_evaluator("bbox"),
        attach_metadata=_attach_fcos_metadata,
    )
)
