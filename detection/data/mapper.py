"""Record -> model input: decode the image, augment image, boxes and masks together, to tensors.

Output of :class:`DatasetMapper` (a plain dict)::

    "image":     uint8 Tensor[3, H, W], RGB; resized (unless ``resize=False``, when the model
                 resizes) and flipped in training, the original
                 image in evaluation (the model resizes and maps predictions back)
    "height", "width": int, the ORIGINAL image size
    "image_id":  the record's image id
    "file_name": str
    "instances": (training only) dict
        "boxes":  float32 Tensor[N, 4], xyxy in the pixels of "image"
        "labels": int64 Tensor[N], contiguous class ids
        "masks":  uint8 Tensor[N, H, W] (only with mask_on)
        "keypoints": float32 Tensor[N, K, 3] (x, y, v) in the pixels of "image" (only with
                  keypoint_on); a flip also exchanges the left/right keypoints

Crowd annotations are dropped in training. Randomness comes only from the ``rng`` argument (a
``np.random.Generator``), so the caller controls reproducibility: :class:`MapDataset` derives
it from ``(seed, epoch, index)``, which is what makes resumed training repeat its augmentations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch

from detection.data.annotations import (
    InvalidSegmentationError,
    annotation_box_label,
    annotation_to_mask,
)
from detection.data.coco import MIN_BOX_SIZE
from detection.data.errors import ImageSizeError, InvalidAnnotationError
from detection.data.image_io import ImageReadError, read_image
from detection.data.keypoints import (
    COCO_PERSON_KEYPOINT_NAMES,
    check_keypoints,
    flip_indices,
    flip_map_from_names,
)

__all__ = [
    "DatasetMapper",
    "InvalidSegmentationError",
    "MapDataset",
    "UnreadableImage",
    "annotation_to_mask",
    "draw_short_edge",
    "keypoint_flip_indices_of",
    "train_resized_shape",
]

logger = logging.getLogger(__name__)


def draw_short_edge(min_sizes: Sequence[int], sampling: str, rng: np.random.Generator) -> int:
    """A training image's short edge: one of ``min_sizes`` ("choice"), or any integer from
    the first to the last ("range"), as detectron2's ``MIN_SIZE_TRAIN_SAMPLING``."""
    if sampling == "range":
        return int(rng.integers(min_sizes[0], min_sizes[-1] + 1))
    return int(min_sizes[int(rng.integers(len(min_sizes)))])


def train_resized_shape(height: int, width: int, short_edge: int,
                        max_size: int) -> tuple[int, int]:
    """The training resize of every mapper: the model's test rule
    (``detection.modeling.preprocess.resized_shape``, detectron2's ResizeShortestEdge) at the
    drawn short edge, so that training at a fixed size sees the test size."""
    from detection.modeling.preprocess import resized_shape

    nh, nw = resized_shape(height, width, short_edge, max_size)
    return max(1, nh), max(1, nw)


class DatasetMapper:
    """Turn a record (see :mod:`detection.data.coco`) into model input (see module doc)."""

    def __init__(
        self,
        is_train: bool,
        *,
        min_size_train: Sequence[int] = tuple(range(640, 801, 32)),
        max_size_train: int = 1333,
        min_size_sampling: str = "choice",
        hflip_prob: float = 0.5,
        photometric: bool = False,
        photometric_prob: float = 0.8,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.02,
        mask_on: bool = False,
        skip_missing_images: bool = False,
        resize: bool = True,
        keypoint_on: bool = False,
        keypoint_flip_indices: Sequence[int] | None = None,
    ) -> None:
        if min_size_sampling not in ("choice", "range"):
            raise ValueError(f"min_size_sampling must be 'choice' or 'range': {min_size_sampling}")
        if min_size_sampling == "range" and len(min_size_train) != 2:
            raise ValueError(f"'range' sampling needs (min, max), got {tuple(min_size_train)}")
        self.is_train = is_train
        self.min_size_train = tuple(int(s) for s in min_size_train)
        self.max_size_train = int(max_size_train)
        self.min_size_sampling = min_size_sampling
        self.hflip_prob = float(hflip_prob)
        self.photometric = photometric
        self.photometric_prob = photometric_prob
        self.jitter = (brightness, contrast, saturation, hue)
        self.mask_on = mask_on
        self.skip_missing_images = skip_missing_images
        self.resize = resize
        self.keypoint_on = keypoint_on
        # index i takes keypoint flip[i] when the image is flipped (COCO persons' by default)
        self.keypoint_flip_indices = list(keypoint_flip_indices) if keypoint_flip_indices \
            is not None else flip_indices(COCO_PERSON_KEYPOINT_NAMES,
                                          flip_map_from_names(COCO_PERSON_KEYPOINT_NAMES))
        # file name -> why it cannot be used; each image is counted (and warned about) once
        self.unreadable: dict[str, str] = {}
        self.num_skipped_instances = 0  # with mask_on: degenerate polygons (warned, not trained)

    @property
    def num_skipped_images(self) -> int:
        """Distinct images skipped so far by this mapper (in this process)."""
        return len(self.unreadable)

    def _load(self, record: dict) -> np.ndarray:
        """The record's image; ImageReadError / ImageSizeError (naming file and id) otherwise."""
        where = f"(record image_id={record.get('image_id')})"
        try:
            image = read_image(record["file_name"])
        except ImageReadError as e:
            raise ImageReadError(f"{e} {where}") from e
        h, w = image.shape[:2]
        rh, rw = record.get("height"), record.get("width")
        if (rh is not None and rh != h) or (rw is not None and rw != w):
            raise ImageSizeError(
                f"Image {record['file_name']} {where} is {h}x{w} (height x width, after EXIF "
                f"orientation) but its record says {rh}x{rw}")
        return image

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool) -> DatasetMapper:
        """Build from ``cfg.INPUT`` (and ``cfg.MODEL.MASK_ON`` when present)."""
        p = cfg.INPUT.PHOTOMETRIC
        model = cfg.get("MODEL", None)
        keypoint_on = bool(model.get("KEYPOINT_ON", False)) if model is not None else False
        return cls(
            is_train,
            min_size_train=cfg.INPUT.MIN_SIZE_TRAIN,
            max_size_train=cfg.INPUT.MAX_SIZE_TRAIN,
            min_size_sampling=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            hflip_prob=cfg.INPUT.HFLIP_PROB,
            photometric=p.ENABLED,
            photometric_prob=p.PROB,
            brightness=p.BRIGHTNESS,
            contrast=p.CONTRAST,
            saturation=p.SATURATION,
            hue=p.HUE,
            mask_on=bool(model.get("MASK_ON", False)) if model is not None else False,
            skip_missing_images=cfg.DATALOADER.SKIP_MISSING_IMAGES,
            # when the model resizes training images itself, the loader must not
            resize=not cfg.INPUT.get("RESIZE_IN_MODEL_TRAIN", False),
            keypoint_on=keypoint_on,
            keypoint_flip_indices=keypoint_flip_indices_of(cfg, cfg.DATASETS.TRAIN)
            if keypoint_on and is_train else None,
        )

    def _transforms(self, h: int, w: int, rng: np.random.Generator) -> A.Compose:
        ops: list[A.BasicTransform] = []
        if self.resize:  # shortest edge to a random size, longest capped; halves round up
            short = draw_short_edge(self.min_size_train, self.min_size_sampling, rng)
            nh, nw = train_resized_shape(h, w, short, self.max_size_train)
            ops.append(A.Resize(nh, nw))
        if rng.random() < self.hflip_prob:  # decided here so that rng alone sets the outcome
            ops.append(A.HorizontalFlip(p=1.0))
        if self.photometric:
            b, c, s, hue = self.jitter
            ops.append(
                A.ColorJitter(
                    brightness=b, contrast=c, saturation=s, hue=hue, p=self.photometric_prob
                )
            )
        return A.Compose(
            ops,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "indices"]),
            seed=int(rng.integers(2**31 - 1)),
        )

    def __call__(
        self, record: dict, rng: np.random.Generator | None = None
    ) -> dict[str, Any] | None:
        """Map one record. Returns None only for an unusable image (unreadable, or not the
        record's size) with skip_missing_images; without, ImageReadError / ImageSizeError.
        A malformed annotation field raises InvalidAnnotationError naming it."""
        file_name = record.get("file_name")
        if not isinstance(file_name, str):
            raise InvalidAnnotationError(
                f"record image_id={record.get('image_id')}: field 'file_name' is "
                f"{file_name!r:.60}, not a path")
        if file_name in self.unreadable:  # known bad: skipped again without a second count
            return None
        try:
            image = self._load(record)
        except (ImageReadError, ImageSizeError) as e:
            if not self.skip_missing_images:
                raise
            self.unreadable[file_name] = str(e)
            logger.warning("Skipping image_id %s (%d distinct images skipped so far): %s",
                           record.get("image_id"), self.num_skipped_images, e)
            return None
        h, w = image.shape[:2]
        out: dict[str, Any] = {
            "height": h,
            "width": w,
            "image_id": record.get("image_id"),
            "file_name": record["file_name"],
        }
        if not self.is_train:
            out["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            return out

        rng = rng if rng is not None else np.random.default_rng()
        where = f"{file_name} (image_id={record.get('image_id')})"
        anns = record.get("annotations", [])
        if not isinstance(anns, list):
            raise InvalidAnnotationError(f"{where}: field 'annotations' is not a list")
        checked = [annotation_box_label(a, where) for a in anns]
        anns = [dict(a, bbox=b, category_id=c) for a, (b, c) in zip(anns, checked)
                if not a.get("iscrowd", 0)]
        masks: dict[int, np.ndarray] = {}
        if self.mask_on:  # decode first: an instance without a usable mask is skipped
            valid = []
            for a in anns:
                try:
                    if "segmentation" not in a:
                        raise InvalidSegmentationError(
                            f"{where}: annotation {a.get('id')} has no 'segmentation' "
                            "(MASK_ON needs one per instance)")
                    masks[len(valid)] = annotation_to_mask(a["segmentation"], h, w,
                                                           ann_id=a.get("id"))
                except InvalidSegmentationError as e:
                    if not isinstance(a.get("segmentation"), list):  # a wrong RLE: bad data
                        raise
                    self.num_skipped_instances += 1
                    logger.warning("Skipping an instance of image_id %s (%d skipped so far): %s",
                                   record.get("image_id"), self.num_skipped_instances, e)
                    continue
                valid.append(a)
            anns = valid
        boxes, labels, keep = [], [], []
        for i, a in enumerate(anns):  # albumentations raises on invalid boxes: clean first
            x0, y0, x1, y1 = a["bbox"]
            x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
            y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
            if x1 - x0 >= MIN_BOX_SIZE and y1 - y0 >= MIN_BOX_SIZE:
                boxes.append([x0, y0, x1, y1])
                labels.append(int(a["category_id"]))
                keep.append(i)
        kwargs: dict[str, Any] = {
            "image": image,
            "bboxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": labels,
            "indices": list(range(len(keep))),
        }
        if self.mask_on and keep:
            kwargs["masks"] = [masks[i] for i in keep]
        compose = self._transforms(h, w, rng)
        res = compose(**kwargs)

        img = res["image"]
        nh, nw = img.shape[:2]
        idx = [int(i) for i in res["indices"]]
        out_boxes = torch.as_tensor(np.asarray(res["bboxes"], np.float32).reshape(-1, 4))
        out_boxes[:, 0::2].clamp_(0, nw)
        out_boxes[:, 1::2].clamp_(0, nh)
        instances: dict[str, torch.Tensor] = {
            "boxes": out_boxes,
            "labels": torch.as_tensor([int(v) for v in res["labels"]], dtype=torch.int64),
        }
        if self.mask_on:
            if idx:
                masks = np.stack([np.asarray(res["masks"][i], np.uint8) for i in idx])
            else:
                masks = np.zeros((0, nh, nw), np.uint8)
            instances["masks"] = torch.from_numpy(masks)
        if self.keypoint_on:
            flipped = any(isinstance(t, A.HorizontalFlip) for t in compose.transforms)
            kps = self._keypoints([anns[i] for i in keep], where)[idx]  # [N, K, 3]
            kps[..., 0] *= nw / w
            kps[..., 1] *= nh / h
            if flipped:
                kps[..., 0] = nw - kps[..., 0]
                kps = kps[:, self.keypoint_flip_indices]
            instances["keypoints"] = torch.from_numpy(np.ascontiguousarray(kps))
        out["image"] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        out["instances"] = instances
        return out


    def _keypoints(self, anns: list[dict], where: str) -> np.ndarray:
        """``(N, K, 3)`` float32 of the annotations' ``keypoints`` (all invisible where one
        has none); InvalidAnnotationError naming the annotation for a malformed array."""
        k = len(self.keypoint_flip_indices)
        out = np.zeros((len(anns), k, 3), np.float32)
        for j, a in enumerate(anns):
            if "keypoints" not in a:
                continue
            try:
                out[j] = np.asarray(check_keypoints(
                    a["keypoints"], k, f"{where}: annotation {a.get('id')}"), np.float32
                ).reshape(k, 3)
            except ValueError as e:
                raise InvalidAnnotationError(str(e)) from e
        return out


def keypoint_flip_indices_of(cfg: Any, dataset_names: Sequence[str]) -> list[int] | None:
    """The flip permutation of the keypoints the datasets name (their ``left_``/``right_``
    pairs); None (COCO's persons) when none that can be read names keypoints. A ValueError
    when they disagree or their count is not ``ROI_KEYPOINT_HEAD.NUM_KEYPOINTS``."""
    from detection.data.catalog import get_metadata

    found = {}
    for name in dataset_names:
        try:
            meta = get_metadata(name)
        except (OSError, KeyError, ValueError):  # not readable here: loading it will say why
            continue
        if meta.get("keypoint_names"):
            found[name] = (meta["keypoint_names"], meta.get("keypoint_flip_map", []))
    if not found:
        return None
    (first, (names, flip_map)), *others = found.items()
    for other, (n, _) in others:
        if list(n) != list(names):
            raise ValueError(f"Datasets {first!r} and {other!r} name different keypoints: "
                             f"{list(names)} and {list(n)}")
    k = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    if len(names) != k:
        raise ValueError(f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS is {k} but dataset {first!r} "
                         f"names {len(names)} keypoints; set it to {len(names)}")
    return flip_indices(names, flip_map)


@dataclass(frozen=True)
class UnreadableImage:
    """What :class:`MapDataset` yields in evaluation for an image the mapper skipped."""

    file_name: str
    image_id: Any
    reason: str


class MapDataset(torch.utils.data.Dataset):
    """Records + mapper, with per-sample randomness from ``(seed, epoch, index)``.

    Keys are an int index, or ``(index, epoch)`` as :class:`~detection.data.samplers.
    TrainingSampler` yields them. With ``skip_missing_images`` an unusable image is replaced
    by another record chosen deterministically (training) or the item is an
    :class:`UnreadableImage` (evaluation; the test loader's collate function drops it and
    counts it in the batch's ``num_unreadable``).
    """

    def __init__(self, records: list[dict], mapper: DatasetMapper, *, seed: int = 0) -> None:
        self.records = records
        self.mapper = mapper
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def rng_for(self, index: int, epoch: int = 0) -> np.random.Generator:
        """The generator the mapper gets for sample ``index`` in ``epoch``."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), int(index)])

    def __getitem__(self, key: int | tuple[int, int]) -> dict | UnreadableImage:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        out = self.mapper(record, self.rng_for(index, epoch))
        if out is not None:
            return out
        if not self.mapper.is_train:
            name = record["file_name"]
            reason = getattr(self.mapper, "unreadable", {}).get(name, "unreadable")
            return UnreadableImage(name, record.get("image_id"), reason)
        retry = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), int(index), 1])
        for _ in range(10):
            other = int(retry.integers(len(self.records)))
            out = self.mapper(self.records[other], self.rng_for(other, epoch))
            if out is not None:
                return out
        raise ImageReadError(f"10 replacement images in a row were unreadable (near index {index})")
