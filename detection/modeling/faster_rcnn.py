"""The two-stage detector: preprocessing, backbone, RPN, RoI heads, and mapping back to the
input images."""

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from backbones import fold_conv_norm, fold_frozen_batchnorm
from backbones.fpn import ConvNorm
from backbones.fused import FusedConv2d, FusedLinear, fuse_conv_relu, use_winograd

from .metadata import Metadata
from .precision import Cast, RefinedRPNHead, check_precision, model_device
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
    """

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
        batch, sizes, targets = detector_inputs(self, images, targets)
        features = self.backbone(batch)
        gt_boxes = [t["boxes"] for t in targets] if targets is not None else None
        proposals, rpn_losses = self.rpn(features, sizes, tuple(batch.shape[-2:]), gt_boxes)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return in_input_pixels(detections, sizes, images)

    def proposals(self, images: Sequence[Tensor]) -> List[Tensor]:
        """RPN proposals per image ``(R_i, 4)`` in the resized image's coordinates (the
        coordinates the RoI heads see), for inspection and tests."""
        batch, sizes, _ = self.preprocessor(images)
        features = self.backbone(as_model_input(self, batch))
        return self.rpn(features, sizes, tuple(batch.shape[-2:]))[0]

    @torch.no_grad()
    def optimize_for_inference(self, channels_last: bool = True, fuse: bool = True,
                               precision: str = "fp32",
                               winograd: bool = True) -> "GeneralizedRCNN":
        """Fold frozen (and eval-mode) BatchNorm into the preceding convs, in the ResNet
        blocks, the FPN and the box head, and use the channels-last layout; with ``fuse``,
        also apply each ReLU and residual add inside its convolution or linear layer
        (oneDNN post-ops, CPU float32; other devices take the plain path). ``precision``
        "bf16" runs the backbone (ResNet and FPN) in bf16 and the heads in float32
        (see ``precision.py``). With ``fuse`` and ``winograd`` in float32, the fused 3x3
        convs of 256 channels or more (FPN outputs, RPN head, ResNet's res4/res5) run as
        Winograd F(4x4, 3x3) on CPU maps of 40 tiles or more, F(6x6, 3x3) on maps of 10,000
        pixels or more (``backbones.winograd``; the mask head's 14x14 RoIs stay direct).
        Inference only:
        the folded model cannot train its norms any more. Returns the model."""
        dtype = check_precision(precision, model_device(self))
        precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        self.eval()
        fold_frozen_batchnorm(self)
        for module in self.modules():
            if isinstance(module, ConvNorm) and not isinstance(module.norm, nn.Identity):
                fused = fold_conv_norm(module.conv, module.norm)
                if fused is not None:
                    module.conv, module.norm = fused, nn.Identity()
        if fuse:
            fuse_conv_relu(self)
            for i, conv in enumerate(self.rpn.head.convs):
                if type(conv) is nn.Conv2d:
                    self.rpn.head.convs[i] = FusedConv2d(conv, relu=True)
            fcs = getattr(self.roi_heads.box_head, "fcs", [])
            for i, fc in enumerate(fcs):
                if type(fc) is nn.Linear:
                    fcs[i] = FusedLinear(fc, relu=True)
        if fuse and winograd and dtype == torch.float32:
            use_winograd(self)
        if hasattr(self.roi_heads.box_head, "use_channels_last"):
            self.roi_heads.box_head.use_channels_last()
        if dtype != torch.float32:  # the backbone in bf16, the heads in float32
            self.backbone.to(dtype)
            if len(self.rpn.head.convs) == 1:  # bf16, refined in float32 at the top anchors
                k = self.rpn.pre_nms_topk[1]
                self.rpn.head = RefinedRPNHead(self.rpn.head, refine_topk=k + k // 4,
                                               dtype=dtype)
            else:
                self.rpn.head = Cast(self.rpn.head, input_dtype=torch.float32,
                                     output_dtype=torch.float32)
        self.precision, self._input_dtype = precision, dtype
        self._channels_last = channels_last or dtype != torch.float32
        if self._channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.rpn.to(memory_format=torch.channels_last)
            self.roi_heads.to(memory_format=torch.channels_last)
        return self


FasterRCNN = GeneralizedRCNN
