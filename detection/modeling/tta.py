"""Test-time augmentation (TTA) of the detectors, as detectron2's ``GeneralizedRCNNWithTTA``.

The wrapped model runs once per augmentation: each shortest edge of ``min_sizes`` (longest
edge capped at ``max_size``), and each on the horizontally flipped image too with ``flip``. An
augmentation sets the model's preprocessor test sizes for its run, so the model resizes and
maps its boxes back to input pixels itself; the wrapper flips back the flipped runs' boxes.

Merging, per image, the detections of every augmentation:

- ``"nms"`` (detectron2's, the default for models with RoI heads): per-class NMS at the model's
  test threshold, then the best ``detections_per_image``;
- ``"vote"`` (the default for one-stage models): the same NMS picks the detections; each box
  becomes the score-weighted mean of the boxes of its class that it suppressed (and itself),
  then a second NMS keeps the output NMS-clean.

Masks, detectron2's way: the mask head runs on the merged boxes in every augmentation's
features; the probabilities, flipped back, are averaged and pasted once (the model's ``paste``).

Keypoints (which detectron2's TTA does not support) the same way: the keypoint head runs on the
merged boxes in every augmentation's features; a flipped run's heatmap logits are mirrored back
and their left/right channels exchanged (the keypoints' flip permutation); the logits are
averaged and decoded once, as the model decodes them, at the scale of the augmentation with the
largest resized image (the finest grid). Heatmaps, not decoded keypoints, are averaged: each
run's maps cover the same box, so they align cell for cell, and the mean keeps the location that
most runs agree on, where a mean of per-run maxima can fall between two candidates (a left and a
right knee) on neither; logits rather than probabilities, so that ``keypoints_scores`` stay on
the plain model's scale and one augmentation reproduces the plain model.

The wrapper reads outputs by their keys and the parts every detector has (``preprocessor``;
``roi_heads.mask_head``, ``roi_heads.keypoint_head``), so a family with the same output
convention needs no code here.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from detection.data.keypoints import (
    COCO_PERSON_KEYPOINT_NAMES,
    flip_indices,
    flip_map_from_names,
)

from .box_ops import batched_nms
from .keypoint_head import decode_heatmaps, shift_keypoints
from .preprocess import as_model_input, rescale_boxes, rescale_keypoints
from .structures import Detections

__all__ = ["MERGE_MODES", "Augmentation", "DetectorWithTTA", "build_tta_model"]

logger = logging.getLogger(__name__)

MERGE_MODES = ("nms", "vote")
_BOX_KEYS = ("boxes", "scores", "labels")
_MASK_KEYS = ("masks", "binary_masks")
_KEYPOINT_KEYS = ("keypoints", "keypoints_scores")


@dataclass(frozen=True)
class Augmentation:
    """One run of the model: shortest edge ``min_size``, longest at most ``max_size``,
    horizontally flipped or not."""

    min_size: int
    max_size: int
    flip: bool


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """``boxes`` ``(N, 4)`` xyxy of an image ``width`` pixels wide, mirrored left-right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                       dim=1)


def _find_setting(model: nn.Module, name: str) -> Any:
    """``name`` on the model, or on its RoI heads (where a two-stage model keeps its test
    NMS threshold and detections per image)."""
    for part in (model, getattr(model, "roi_heads", None)):
        if part is not None and hasattr(part, name):
            return getattr(part, name)
    raise ValueError(f"{type(model).__name__} has no {name!r} (nor its roi_heads); pass it to "
                     "DetectorWithTTA")


@contextmanager
def _test_sizes(preprocessor: nn.Module, min_size: int, max_size: int) -> Iterator[None]:
    old = preprocessor.min_size_test, preprocessor.max_size_test
    preprocessor.min_size_test, preprocessor.max_size_test = int(min_size), int(max_size)
    try:
        yield
    finally:
        preprocessor.min_size_test, preprocessor.max_size_test = old


class DetectorWithTTA(nn.Module):
    """A detector run on several sizes (and flips) of each image, its detections merged.

    Same call convention as the detectors in eval mode: ``tta(images)``, a list of RGB
    ``(3, H_i, W_i)`` 0-255 tensors -> per image ``boxes`` ``(N, 4)`` xyxy in input pixels,
    ``scores``, ``labels`` (and ``masks`` ``(N, 1, H_i, W_i)``, ``binary_masks``
    ``(N, H_i, W_i)`` for Mask R-CNN; ``keypoints`` ``(N, K, 3)`` in input pixels and
    ``keypoints_scores`` ``(N, K)`` for Keypoint R-CNN), with ``N <= detections_per_image``.

    Args:
        model: a detector of any family that resizes its input with ``model.preprocessor``.
        min_sizes: shortest edges to run at (detectron2's ``TEST.AUG.MIN_SIZES``).
        max_size: cap on the longest edge (``TEST.AUG.MAX_SIZE``).
        flip: also run each size on the horizontally flipped image (``TEST.AUG.FLIP``).
        nms_thresh, detections_per_image: of the merge; default: the model's test settings.
        merge: "nms" or "vote" (module doc); default "nms" for models with ``roi_heads``,
            "vote" for the others.
        keypoint_flip_indices: for a keypoint model with ``flip``: index i of a flipped run
            takes keypoint ``keypoint_flip_indices[i]`` (``detection.data.keypoints.
            flip_indices``; a zoo entry's ``keypoints.flip_indices``); default: COCO's person
            pairs for 17 keypoints, else required.
    """

    def __init__(self, model: nn.Module, *, min_sizes: Sequence[int], max_size: int,
                 flip: bool = True, nms_thresh: Optional[float] = None,
                 detections_per_image: Optional[int] = None,
                 merge: Optional[str] = None,
                 keypoint_flip_indices: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if isinstance(model, DetectorWithTTA):
            raise TypeError("the model is already wrapped in DetectorWithTTA")
        pre = getattr(model, "preprocessor", None)
        if pre is None or not hasattr(pre, "min_size_test"):
            raise TypeError(f"test-time augmentation needs a detector that resizes its input "
                            f"(model.preprocessor); {type(model).__name__} has none (an "
                            "exported model cannot change its input size: use the torch runtime)")
        min_sizes = [int(s) for s in min_sizes]
        if not min_sizes or min(min_sizes) <= 0 or int(max_size) <= 0:
            raise ValueError(f"TTA sizes must be positive: min_sizes {min_sizes}, max_size "
                             f"{max_size}")
        merge = merge or ("nms" if hasattr(model, "roi_heads") else "vote")
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
        self.model = model  # not "module": evaluation unwraps DDP's .module
        self.augmentations = [Augmentation(s, int(max_size), f)
                              for s in min_sizes for f in ((False, True) if flip else (False,))]
        self.nms_thresh = float(nms_thresh if nms_thresh is not None
                                else _find_setting(model, "nms_thresh"))
        self.detections_per_image = int(detections_per_image if detections_per_image is not None
                                        else _find_setting(model, "detections_per_image"))
        self.merge = merge
        self.keypoint_flip_indices = self._flip_indices(keypoint_flip_indices)

    def _flip_indices(self, given: Optional[Sequence[int]]) -> Optional[List[int]]:
        """The keypoint permutation of a flipped run (None without a flipped run or keypoint
        head); checked to permute the head's K keypoints."""
        head = getattr(getattr(self.model, "roi_heads", None), "keypoint_head", None)
        if head is None or not any(a.flip for a in self.augmentations):
            return None
        k = int(head.num_keypoints)
        if given is None:
            if k != len(COCO_PERSON_KEYPOINT_NAMES):
                raise ValueError(f"flip test-time augmentation of a model with {k} keypoints "
                                 "needs keypoint_flip_indices (which keypoint a horizontal "
                                 "flip turns each into)")
            given = flip_indices(COCO_PERSON_KEYPOINT_NAMES,
                                 flip_map_from_names(COCO_PERSON_KEYPOINT_NAMES))
        perm = [int(i) for i in given]
        if sorted(perm) != list(range(k)):
            raise ValueError(f"keypoint_flip_indices {perm} is not a permutation of the "
                             f"model's {k} keypoints")
        return perm

    # ---------------------------------------------------------------- the model's interface

    @property
    def metadata(self) -> Any:
        return self.model.metadata

    @metadata.setter
    def metadata(self, value: Any) -> None:
        self.model.metadata = value

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def training_states(self) -> Dict[str, Any]:
        return self.model.training_states()

    def extra_repr(self) -> str:
        sizes = sorted({a.min_size for a in self.augmentations})
        flip = any(a.flip for a in self.augmentations)
        return (f"min_sizes={sizes}, max_size={self.augmentations[0].max_size}, flip={flip}, "
                f"merge={self.merge!r}, nms_thresh={self.nms_thresh}, "
                f"detections_per_image={self.detections_per_image}")

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor],
                targets: Optional[List[Dict[str, Tensor]]] = None) -> List[Dict[str, Tensor]]:
        if self.training or targets is not None:
            raise RuntimeError("DetectorWithTTA is for inference: call .eval() and pass images "
                               "only (train the wrapped model itself)")
        keys: Set[str] = set()
        runs = [self.detect(images, aug, keys) for aug in self.augmentations]  # [A][N] dicts
        results = [self._merge([run[i] for run in runs], tuple(img.shape[-2:]))
                   for i, img in enumerate(images)]
        if "masks" in keys:
            self._add_masks(images, results, "binary_masks" in keys)
        if "keypoints" in keys:
            self._add_keypoints(images, results)
        return results

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], aug: Augmentation,
               keys: Optional[Set[str]] = None) -> List[Dict[str, Tensor]]:
        """The model's ``boxes`` (in input pixels, flipped back), ``scores`` and ``labels``
        of ``images`` under one augmentation, before merging; masks and keypoints are left
        out (they are computed for the merged boxes). Adds the output's keys to ``keys``."""
        keys = set() if keys is None else keys
        inputs = [img.flip(-1) for img in images] if aug.flip else list(images)
        with _test_sizes(self.model.preprocessor, aug.min_size, aug.max_size):
            outputs = self.model(inputs)
        runs = []
        for out, img in zip(outputs, images):
            keys.update(out)
            unknown = set(out) - set(_BOX_KEYS) - set(_MASK_KEYS) - set(_KEYPOINT_KEYS)
            if unknown:
                raise ValueError(f"DetectorWithTTA cannot merge the output keys {sorted(unknown)}"
                                 f" of {type(self.model).__name__}")
            boxes = out["boxes"]
            if aug.flip:
                boxes = hflip_boxes(boxes, int(img.shape[-1]))
            runs.append({"boxes": boxes, "scores": out["scores"], "labels": out["labels"]})
        return runs

    def _merge(self, per_aug: List[Dict[str, Tensor]],
               image_size: Tuple[int, int]) -> Dict[str, Tensor]:
        """One image's detections of every augmentation -> the merged ones (module doc),
        boxes clipped to the image of ``image_size`` (h, w)."""
        boxes = torch.cat([d["boxes"].float() for d in per_aug])  # [D, 4]
        scores = torch.cat([d["scores"].float() for d in per_aug])  # [D]
        labels = torch.cat([d["labels"] for d in per_aug])  # [D]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)
        keep = keep[: self.detections_per_image]  # by decreasing score
        kept = boxes[keep]
        if self.merge == "vote" and keep.numel():
            # [K, D]: the boxes of the same class that NMS let each kept box stand for
            voters = (box_iou(kept, boxes) > self.nms_thresh) & (labels[keep][:, None] == labels)
            voters[torch.arange(keep.numel(), device=keep.device), keep] = True
            weights = voters * scores[None]
            kept = rescale_boxes((weights @ boxes) / weights.sum(dim=1, keepdim=True),
                                 image_size, image_size)  # clipped: the mean may round out
            # the mean moves boxes: NMS once more, so that the output stays NMS-clean
            again = batched_nms(kept, scores[keep], labels[keep], self.nms_thresh)
            keep, kept = keep[again], kept[again]
        dtype = per_aug[0]["boxes"].dtype
        return {"boxes": kept.to(dtype), "scores": scores[keep].to(per_aug[0]["scores"].dtype),
                "labels": labels[keep]}

    def _add_masks(self, images: Sequence[Tensor], results: List[Dict[str, Tensor]],
                   binary: bool) -> None:
        """``masks`` (and ``binary_masks``) of the merged boxes: the mask head's
        probabilities averaged over the augmentations, pasted by the model (module doc)."""
        model = self.model
        mask_head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
        if mask_head is None or not hasattr(model, "paste"):
            raise TypeError(f"{type(model).__name__} returns masks but has no "
                            "roi_heads.mask_head and paste() for DetectorWithTTA to merge them")
        total: Optional[List[Tensor]] = None
        if any(r["boxes"].shape[0] for r in results):
            for aug in self.augmentations:
                probs = self._mask_probs(images, results, aug, mask_head)
                total = probs if total is None else [t + p for t, p in zip(total, probs)]
        for i, (res, img) in enumerate(zip(results, images)):
            size = (int(img.shape[-2]), int(img.shape[-1]))
            n, m = res["boxes"].shape[0], mask_head.resolution
            mean = total[i] / len(self.augmentations) if total is not None \
                else res["boxes"].new_zeros((n, 1, m, m))
            pasted = model.paste(mean, res["boxes"], size)
            res["masks"] = pasted["masks"]
            if binary:
                res["binary_masks"] = pasted["binary_masks"]

    def _merged_in_aug(self, images: Sequence[Tensor], results: List[Dict[str, Tensor]],
                       aug: Augmentation) -> Tuple[Dict[str, Tensor], List[Detections],
                                                   List[Tuple[int, int]]]:
        """``aug``'s features of ``images``, the merged detections in its resized (and, when
        it flips, mirrored) images, and the resized ``(h, w)`` of each image."""
        model = self.model
        inputs = [img.flip(-1) for img in images] if aug.flip else list(images)
        with _test_sizes(model.preprocessor, aug.min_size, aug.max_size):
            batch, sizes, _ = model.preprocessor(inputs)
        features = model.backbone(as_model_input(model, batch))
        dets = []
        for res, img, size in zip(results, images, sizes):
            h, w = int(img.shape[-2]), int(img.shape[-1])
            boxes = hflip_boxes(res["boxes"], w) if aug.flip else res["boxes"]
            boxes = rescale_boxes(boxes.float(), (h, w), size, clip=False)  # resized pixels
            dets.append(Detections(boxes=boxes, scores=res["scores"], labels=res["labels"]))
        return features, dets, [(int(a), int(b)) for a, b in sizes]

    def _mask_probs(self, images: Sequence[Tensor], results: List[Dict[str, Tensor]],
                    aug: Augmentation, mask_head: nn.Module) -> List[Tensor]:
        """Per image, ``(N_i, 1, M, M)`` mask probabilities of the merged boxes in ``aug``'s
        features, flipped back to the input's orientation."""
        features, dets, _ = self._merged_in_aug(images, results, aug)
        dets = mask_head.predict(features, dets)
        return [d.masks.float().flip(-1) if aug.flip else d.masks.float() for d in dets]

    def _add_keypoints(self, images: Sequence[Tensor], results: List[Dict[str, Tensor]]) -> None:
        """``keypoints`` (in input pixels, COCO's convention) and ``keypoints_scores`` of the
        merged boxes: the heatmap logits averaged over the augmentations (module doc)."""
        head = getattr(getattr(self.model, "roi_heads", None), "keypoint_head", None)
        if head is None:
            raise TypeError(f"{type(self.model).__name__} returns keypoints but has no "
                            "roi_heads.keypoint_head for DetectorWithTTA to merge them")
        k = int(head.num_keypoints)
        total: List[Optional[Tensor]] = [None] * len(images)
        # per image: (resized area, resized size, the boxes there) of its finest unflipped run
        finest: List[Tuple[int, Tuple[int, int], Optional[Tensor]]] = \
            [(-1, (0, 0), None)] * len(images)
        if any(r["boxes"].shape[0] for r in results):
            for aug in self.augmentations:
                features, dets, sizes = self._merged_in_aug(images, results, aug)
                maps = head(head.pooler([features[f] for f in head.in_features],
                                        [d.boxes for d in dets])).float()  # [sum N_i, K, M, M]
                per_image = maps.split([d.boxes.shape[0] for d in dets])
                for i, (m, d, size) in enumerate(zip(per_image, dets, sizes)):
                    if aug.flip:
                        m = m.flip(-1)[:, self.keypoint_flip_indices]
                    total[i] = m if total[i] is None else total[i] + m
                    if not aug.flip and size[0] * size[1] > finest[i][0]:
                        finest[i] = (size[0] * size[1], size, d.boxes)
        for i, (res, img) in enumerate(zip(results, images)):
            n = res["boxes"].shape[0]
            if n == 0 or total[i] is None:
                res["keypoints"] = res["boxes"].new_zeros((n, k, 3))
                res["keypoints_scores"] = res["boxes"].new_zeros((n, k))
                continue
            _, size, boxes = finest[i]
            if boxes is None:  # flipped runs only: decode in the input's pixels
                size, boxes = tuple(img.shape[-2:]), res["boxes"].float()
            keypoints, scores = decode_heatmaps(total[i] / len(self.augmentations), boxes)
            keypoints = rescale_keypoints(keypoints, size, tuple(img.shape[-2:]))
            out = shift_keypoints({"keypoints": keypoints}, -head.coordinate_offset)
            res["keypoints"] = out["keypoints"].to(res["boxes"].dtype)
            res["keypoints_scores"] = scores.to(res["boxes"].dtype)


def tta_settings(cfg: Any) -> Tuple[bool, Tuple[int, ...], int, bool]:
    """``TEST.AUG``: (enabled, min_sizes, max_size, flip), every key read."""
    aug = cfg.TEST.AUG
    return (bool(aug.ENABLED), tuple(int(s) for s in aug.MIN_SIZES), int(aug.MAX_SIZE),
            bool(aug.FLIP))


def build_tta_model(cfg: Any, model: nn.Module, enabled: Optional[bool] = None) -> nn.Module:
    """``model`` wrapped in :class:`DetectorWithTTA` with ``cfg.TEST.AUG``'s sizes and flip
    when ``enabled`` (default: ``TEST.AUG.ENABLED``), else ``model`` itself. Logs the
    augmentations when it wraps."""
    on, min_sizes, max_size, flip = tta_settings(cfg)
    if not (on if enabled is None else enabled):
        return model
    flip_indices = None
    if flip and getattr(getattr(model, "roi_heads", None), "keypoint_head", None) is not None:
        from detection.data.mapper import keypoint_flip_indices_of

        flip_indices = keypoint_flip_indices_of(cfg, cfg.DATASETS.TEST)  # the test set's pairs
    tta = DetectorWithTTA(model, min_sizes=min_sizes, max_size=max_size, flip=flip,
                          keypoint_flip_indices=flip_indices)
    logger.info("Test-time augmentation on (TEST.AUG): shortest edges %s, longest at most %d, "
                "horizontal flip %s: %d runs per image, merged by %s (NMS %.2f, at most %d "
                "per image)", list(min_sizes), max_size, "on" if flip else "off",
                len(tta.augmentations), "per-class NMS" if tta.merge == "nms"
                else "box voting", tta.nms_thresh, tta.detections_per_image)
    return tta
