"""Panoptic FPN from a config (the only place here that reads it): Mask R-CNN's builder for
the detector, the semantic builder's ``SemSegFPNHead`` on the same FPN, and
``MODEL.PANOPTIC_FPN.*`` (declared in ``segmentation.config``) for the loss weights and the
merge."""

from fvcore.common.config import CfgNode

from segmentation.mask_rcnn.build import build_mask_rcnn
from segmentation.semantic.build import build_semantic_head

from .model import PanopticFPN

__all__ = ["build_panoptic_fpn"]


def build_panoptic_fpn(cfg: CfgNode) -> PanopticFPN:
    """Panoptic FPN as ``cfg`` describes it, on ``MODEL.DEVICE``."""
    h, p = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.PANOPTIC_FPN
    if h.NAME != "SemSegFPNHead":
        raise ValueError(f"Panoptic FPN's semantic branch is 'SemSegFPNHead'; "
                         f"MODEL.SEM_SEG_HEAD.NAME is {h.NAME!r}")
    det = build_mask_rcnn(cfg)
    head = build_semantic_head(cfg, det.backbone.output_shape())
    c = p.COMBINE
    if p.STUFF_CLASS_NAMES:
        if len(p.STUFF_CLASS_NAMES) != h.NUM_CLASSES:
            raise ValueError(f"MODEL.PANOPTIC_FPN.STUFF_CLASS_NAMES names "
                             f"{len(p.STUFF_CLASS_NAMES)} semantic labels but "
                             f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {h.NUM_CLASSES}")
        det.metadata.stuff_names = [str(n) for n in p.STUFF_CLASS_NAMES]
    model = PanopticFPN(
        preprocessor=det.preprocessor, backbone=det.backbone, rpn=det.rpn,
        roi_heads=det.roi_heads, metadata=det.metadata, paste_mode=det.paste_mode,
        mask_threshold=det.mask_threshold, sem_seg_head=head,
        sem_seg_loss_weight=h.LOSS_WEIGHT, instance_loss_weight=p.INSTANCE_LOSS_WEIGHT,
        ignore_value=h.IGNORE_VALUE, combine=c.ENABLED, overlap_thresh=c.OVERLAP_THRESH,
        stuff_area_limit=c.STUFF_AREA_LIMIT, score_thresh=c.INSTANCES_CONFIDENCE_THRESH,
    )
    return model.to(cfg.MODEL.DEVICE)
