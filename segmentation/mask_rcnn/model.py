"""Mask R-CNN: the two-stage detector of ``detection`` with a mask head, whose masks are pasted
into the input images once the boxes are mapped back to input pixels."""

from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor

from detection.modeling.faster_rcnn import GeneralizedRCNN
from detection.modeling.preprocess import Preprocessor

from .paste import PASTE_MODES, paste_masks
from .targets import resize_masks


class MaskPreprocessor(Preprocessor):
    """The detector's preprocessing, plus resizing the targets' ``masks`` (nearest) along with
    the image when the model itself resizes training images."""

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Tuple[Tensor, List[Tuple[int, int]], Optional[List[Dict[str, Tensor]]]]:
        batch, sizes, targets = super().forward(images, targets)
        if targets is not None:
            for t, size in zip(targets, sizes):
                if "masks" in t:
                    t["masks"] = resize_masks(t["masks"], size)
        return batch, sizes, targets

    @classmethod
    def from_preprocessor(cls, p: Preprocessor) -> "MaskPreprocessor":
        return cls(pixel_mean=p._mean, pixel_std=p._std, input_format=p.input_format,
                   min_size_test=p.min_size_test, max_size_test=p.max_size_test,
                   min_size_train=p.min_size_train, max_size_train=p.max_size_train,
                   resize_mode=p.resize_mode, resize_in_train=p.resize_in_train,
                   size_divisibility=p.size_divisibility)


class MaskRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` whose ``roi_heads`` carry a mask head (see ``MaskRCNNHead``).

    In eval mode each image's result has, besides ``boxes``, ``scores`` and ``labels``:
    ``masks`` ``(N, 1, H, W)`` float mask probabilities pasted into the input image (as
    torchvision returns them) and ``binary_masks`` ``(N, H, W)`` bool, probabilities
    >= ``mask_threshold``. Training targets need ``masks`` ``(G, H, W)`` uint8.

    Args:
        paste_mode: "torchvision" or "detectron2", the pasting convention (see ``paste``).
        mask_threshold: binarization threshold.
        (others: as ``GeneralizedRCNN``)

    In bf16 (``detection.optimize``) the mask head's convs and deconvolution run in bf16 too,
    its per-class predictor in float32 (RoIAlign hands them float32 features).
    """

    bf16_split = {**GeneralizedRCNN.bf16_split, "roi_heads.mask_head.convs": "bf16",
                  "roi_heads.mask_head.deconv": "bf16->fp32"}

    def __init__(self, *, paste_mode: str = "torchvision", mask_threshold: float = 0.5,
                 **parts) -> None:
        super().__init__(**parts)
        if self.roi_heads.mask_head is None:
            raise ValueError("MaskRCNN needs roi_heads with a mask_head")
        if paste_mode not in PASTE_MODES:
            raise ValueError(f"paste_mode must be one of {PASTE_MODES}, got {paste_mode!r}")
        self.paste_mode, self.mask_threshold = paste_mode, float(mask_threshold)

    def forward(
        self, images: Sequence[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        out = super().forward(images, targets)
        if self.training:
            return out
        for res, img in zip(out, images):
            res.update(self.paste(res["masks"], res["boxes"], tuple(img.shape[-2:])))
        return out

    def paste(self, masks: Tensor, boxes: Tensor,
              image_size: Tuple[int, int]) -> Dict[str, Tensor]:
        """``masks`` ``(N, 1, M, M)`` probabilities of ``boxes`` ``(N, 4)`` (input pixels)
        -> ``masks`` ``(N, 1, H, W)`` pasted into an image of ``image_size`` and
        ``binary_masks`` ``(N, H, W)``: the model's output convention (also used by
        ``detection.modeling.tta`` for the masks it averages)."""
        probs = paste_masks(masks, boxes, image_size, mode=self.paste_mode)
        return {"masks": probs[:, None], "binary_masks": probs >= self.mask_threshold}
