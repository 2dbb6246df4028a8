"""Evaluation: COCO AP for boxes and masks."""

from detection.evaluation.coco_evaluation import (
    COCOEvaluator,
    detections_to_coco_results,
    write_coco_submission,
)

__all__ = ["COCOEvaluator", "detections_to_coco_results", "write_coco_submission"]
