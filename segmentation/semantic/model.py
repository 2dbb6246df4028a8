"""``SemanticSegmentor``: images in, per-pixel class logits out (and the losses in training).

The model owns preprocessing, as the detectors do: it takes a list of RGB images ``(3, H_i,
W_i)`` on a 0-255 scale (uint8 or float), converts to the weights' channel order, normalizes with
the pixel mean/std, and pads the batch (zeros after normalization) to a common size divisible
by ``size_divisibility``. The head's logits are upsampled bilinearly to the padded size and each
image's region is cut out, so with no padding the output equals torchvision's
``F.interpolate(classifier(features), size=input_size)``.
"""

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detection.modeling.preprocess import as_model_input

__all__ = ["SemanticSegmentor"]


class SemanticSegmentor(nn.Module):
    """Backbone + semantic head (+ optional auxiliary head), trained with per-pixel
    cross-entropy that skips ``ignore_value``.

    Args:
        backbone: normalized (N, 3, H, W) -> dict of feature maps (a ``backbones.Backbone``).
        head: dict of feature maps -> logits (N, K, h, w); see ``segmentation.semantic.heads``.
        aux_head: optional head on another feature map (torchvision's ``aux_classifier``); its
            loss is added with weight ``aux_loss_weight`` in training, and it is not run in
            evaluation.
        pixel_mean, pixel_std: 0-255 scale, in the order of ``input_format``.
        input_format: "RGB" or "BGR": the channel order the weights expect (inputs are RGB).
        size_divisibility: pad the batch to a multiple of it (0: to the largest image only).
        ignore_value: label of pixels that count for nothing (255).
        loss_weight: weight of the main loss.
        metadata: what the K outputs mean (``detection.modeling.metadata.Metadata`` or any
            object with ``to_dict()``), saved with checkpoints.

    In bf16 (``detection.optimize``) the backbone runs in bf16, the heads in float32.
    """

    bf16_split = {"backbone": "input", "head": "fp32", "aux_head": "fp32"}

    def __init__(
        self, *, backbone: nn.Module, head: nn.Module, aux_head: Optional[nn.Module] = None,
        pixel_mean: Sequence[float], pixel_std: Sequence[float], input_format: str = "RGB",
        size_divisibility: int = 0, ignore_value: int = 255, loss_weight: float = 1.0,
        aux_loss_weight: float = 0.5, metadata: Any = None,
    ) -> None:
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"pixel_mean and pixel_std need 3 values, got {list(pixel_mean)} "
                             f"and {list(pixel_std)}")
        self.backbone, self.head, self.aux_head = backbone, head, aux_head
        self.input_format = input_format
        self.size_divisibility = int(size_divisibility)
        self.ignore_value = int(ignore_value)
        self.loss_weight, self.aux_loss_weight = float(loss_weight), float(aux_loss_weight)
        self.metadata = metadata
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), False)
        self._scale_checked = False

    @property
    def num_classes(self) -> int:
        """The semantic classes the head predicts (its output channels)."""
        return int(self.head.predictor.out_channels)

    def training_states(self) -> Dict[str, Any]:
        """States to save in training checkpoints besides the weights: none."""
        return {}

    # ------------------------------------------------------------------ preprocessing
    def _check_images(self, images: List[Tensor]) -> None:
        if isinstance(images, Tensor):
            raise TypeError("SemanticSegmentor takes a list of (3, H, W) images, got one "
                            f"Tensor of shape {tuple(images.shape)}; pass list(batch)")
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"image {i} must be (3, H, W) RGB, got {tuple(im.shape)}")
        # checked on the first float batch only: the check syncs with the device
        if (not self._scale_checked and images
                and all(im.is_floating_point() for im in images)):
            self._scale_checked = True
            if all(float(im.max()) <= 1.0 and float(im.min()) >= 0.0 for im in images):
                warnings.warn("SemanticSegmentor expects RGB images on a 0-255 scale; every "
                              "value of this float batch lies in [0, 1]", stacklevel=3)

    def preprocess(self, images: List[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """list of (3, H_i, W_i) RGB 0-255 -> normalized padded batch (N, 3, H, W) and the
        sizes (H_i, W_i)."""
        self._check_images(images)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        d = max(self.size_divisibility, 1)
        ph = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        pw = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = self.pixel_mean.new_zeros((len(images), 3, ph, pw))
        for i, im in enumerate(images):
            x = im.to(self.pixel_mean.device, torch.float32)
            if self.input_format == "BGR":
                x = x.flip(0)
            batch[i, :, : x.shape[1], : x.shape[2]] = (x - self.pixel_mean) / self.pixel_std
        return batch, sizes

    # ------------------------------------------------------------------ forward
    def forward_logits(self, x: Tensor) -> Dict[str, Tensor]:
        """Normalized (N, 3, H, W) -> {"out": (N, K, H, W)} (and "aux" with an auxiliary head
        in training), upsampled bilinearly to H x W: torchvision's segmentation forward."""
        features = self.backbone(x)
        size = x.shape[-2:]
        out = {"out": F.interpolate(self.head(features), size=size, mode="bilinear",
                                    align_corners=False)}
        if self.aux_head is not None and self.training:
            out["aux"] = F.interpolate(self.aux_head(features), size=size, mode="bilinear",
                                       align_corners=False)
        return out

    def forward(
        self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Any:
        """Training: ``targets[i]["sem_seg"]`` is an int64 (H_i, W_i) label map -> dict of
        losses (``loss_sem_seg``, and ``loss_sem_seg_aux`` with an auxiliary head).
        Evaluation: a list with one ``{"sem_seg": (K, H_i, W_i) logits}`` per image."""
        batch, sizes = self.preprocess(images)
        batch = as_model_input(self, batch)
        if self.training:
            if targets is None:
                raise ValueError("SemanticSegmentor in training mode needs targets with "
                                 "'sem_seg' label maps")
            labels = self._pad_targets(targets, sizes, batch.shape[-2:])
            out = self.forward_logits(batch)
            losses = {"loss_sem_seg": self.loss_weight * F.cross_entropy(
                out["out"], labels, ignore_index=self.ignore_value)}
            if "aux" in out:
                losses["loss_sem_seg_aux"] = self.aux_loss_weight * F.cross_entropy(
                    out["aux"], labels, ignore_index=self.ignore_value)
            return losses
        logits = self.forward_logits(batch)["out"]
        return [{"sem_seg": logits[i, :, :h, :w]} for i, (h, w) in enumerate(sizes)]

    def _pad_targets(
        self, targets: List[Dict[str, Tensor]], sizes: List[Tuple[int, int]], padded: torch.Size
    ) -> Tensor:
        """Label maps (H_i, W_i) -> (N, H, W) int64, padding with ``ignore_value``."""
        if len(targets) != len(sizes):
            raise ValueError(f"{len(sizes)} images but {len(targets)} targets")
        labels = torch.full((len(sizes), *padded), self.ignore_value, dtype=torch.int64,
                            device=self.pixel_mean.device)
        for i, (t, (h, w)) in enumerate(zip(targets, sizes)):
            if "sem_seg" not in t:
                raise KeyError(f"target {i} has no 'sem_seg' label map (keys: {list(t)})")
            sem = t["sem_seg"]
            if tuple(sem.shape) != (h, w):
                raise ValueError(f"target {i}: label map {tuple(sem.shape)} does not match its "
                                 f"image {(h, w)}")
            labels[i, :h, :w] = sem.to(labels.device, torch.int64)
        return labels
