"""The Mask R-CNN model family: ``MODEL.META_ARCHITECTURE: MaskRCNN`` (or detectron2's
``GeneralizedRCNN`` with ``MODEL.MASK_ON: True``). Detection's data mapper feeds it (it reads
``MODEL.MASK_ON`` and makes mask targets); COCO AP of boxes and masks scores it; its weights are
ours, torchvision's ``maskrcnn_resnet50_fpn(_v2)`` or detectron2's, loaded exactly."""

from detection.families import (
    FASTER_RCNN,
    ModelFamily,
    attach_instance_metadata,
    coco_evaluator,
    register_family,
    strict_weight_loader,
)

from .build import build_mask_rcnn
from .convert import to_ours

__all__ = ["MASK_RCNN"]

MASK_RCNN = register_family(
    ModelFamily(
        name="MaskRCNN",
        build=build_mask_rcnn,
        load_weights=strict_weight_loader(to_ours),
        build_mapper=FASTER_RCNN.build_mapper,
        build_evaluator=coco_evaluator("bbox", "segm"),
        attach_metadata=attach_instance_metadata,
        declared_by="segmentation",
    )
)
