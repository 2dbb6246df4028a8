"""The two-stage detector: preprocessing, backbone, RPN, RoI heads, and mapping back to the
input images."""

from typing import Dict, List, Optional, Sequence, Union

from torch import Tensor, nn

from .keypoint_head import shift_keypoints
from .metadata import Metadata
from .preprocess import Preprocessor, as_model_input, detector_inputs, in_input_pixels
from .roi_heads import StandardROIHeads
from .rpn import RPN


class GeneralizedRCNN(nn.Module):
    """Faster R-CNN (FPN or C4, by the parts given) that owns its preprocessing.

    ``model(images)`` in eval mode: ``images`` is a list of RGB ``(3, H_i, W_i)`` tensors on a
    0-255 scale (uint8 or float); returns per image a dict with ``boxes`` ``(N, 4)`` xyxy in
    input-image pixels, ``scores`` ``(N,)`` and ``labels`` ``(N,)`` in 0..K-1 (see
    ``metadata`` for names and dataset category ids).

    ``model(images, targets)`` in training: ``targets[i]`` holds ``boxes`` ``(G_i, 4)`` xyxy in
    image i's pixels and ``labels`` ``(G_i,)`` int64 in 0..K-1 (``G_i`` may be 0); returns a
    dict of scalar losses.

    ``detection.optimize.optimize_for_inference`` runs the model in bf16 as ``bf16_split``
    says: the backbone in bf16, the RPN head ranked in bf16 and refined in float32, every
    other part (anchors, proposals, RoIAlign, box head, predictor, NMS) in float32.
    """

    bf16_split = {"backbone": "input", "rpn.head": "refined"}

    def __init__(self, *, preprocessor: Preprocessor, backbone: nn.Module, rpn: RPN,
                 roi_heads: StandardROIHeads, metadata: Optional[Metadata] = None) -> None:
        super().__init__()
        self.preprocessor, self.backbone = preprocessor, backbone
        self.rpn, self.roi_heads = rpn, roi_heads
        k = roi_heads.num_classes
        self.metadata = metadata or Metadata(class_names=[f"class_{i}" for i in range(k)])
        if self.metadata.num_classes != k:
            raise ValueError(f"metadata names {self.metadata.num_classes} classes but the box "
                             f"predictor has {k}")

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def training_states(self) -> Dict[str, object]:
        """States to save in training checkpoints besides the weights: none."""
        return {}

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        # keypoints: COCO's pixel indices outside, the weights' convention inside
        offset = getattr(getattr(self.roi_heads, "keypoint_head", None), "coordinate_offset", 0.0)
        if offset and targets is not None:
            targets = [shift_keypoints(t, offset) for t in targets]
        batch, sizes, targets = detector_inputs(self, images, targets)
        features = self.backbone(batch)
        gt_boxes = [t["boxes"] for t in targets] if targets is not None else None
        proposals, rpn_losses = self.rpn(features, sizes, tuple(batch.shape[-2:]), gt_boxes)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        results = in_input_pixels(detections, sizes, images)
        return [shift_keypoints(r, -offset) for r in results] if offset else results

    def proposals(self, images: Sequence[Tensor]) -> List[Tensor]:
        """RPN proposals per image ``(R_i, 4)`` in the resized image's coordinates (the
        coordinates the RoI heads see), for inspection and tests."""
        batch, sizes, _ = self.preprocessor(images)
        features = self.backbone(as_model_input(self, batch))
        return self.rpn(features, sizes, tuple(batch.shape[-2:]))[0]


FasterRCNN = GeneralizedRCNN
