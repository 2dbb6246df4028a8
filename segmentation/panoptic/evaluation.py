"""Panoptic quality (Kirillov et al., CVPR 2019), computed as the COCO panoptic API does it.

Per image, every ground-truth segment ``g`` and predicted segment ``p`` of the same category
overlap by ``|g & p|`` pixels. Their IoU leaves void out of the union::

    IoU(g, p) = |g & p| / (|g| + |p| - |g & p| - |void & p|)

A pair with IoU > 0.5 is a match (a true positive; at most one per segment, so no assignment
is needed). Unmatched ground-truth segments are false negatives, except crowd segments, which
are never matched nor counted. An unmatched prediction is a false positive unless more than
half of it lies on void pixels or on the crowd region of its own category. Per category::

    PQ = sum IoU(tp) / (TP + FP / 2 + FN / 2),  SQ = sum IoU(tp) / TP,  RQ = TP / (TP + FP/2 + FN/2)

and PQ, SQ, RQ are the means over the categories with TP + FP + FN > 0 (all of them, things,
stuff). ``PanopticEvaluator`` accumulates ``(iou, tp, fp, fn)`` per category, sums the table
over torch.distributed ranks, and reports on a 0-100 scale under the task ``"panoptic_seg"``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .format import (
    VOID,
    PanopticFormatError,
    check_segment_ids,
    read_panoptic_png,
    segment_areas,
    segments_to_json,
    write_panoptic_png,
)

__all__ = ["PanopticEvaluator", "pq_from_stats", "pq_stats"]

logger = logging.getLogger(__name__)

_OFFSET = 1 << 32  # pairs of ids packed into one int64: gt * _OFFSET + pred


def pq_stats(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
             pred_ids: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
             categories: Sequence[int], *, source: str = "image") -> np.ndarray:
    """One image's statistics: ``(C, 4)`` float64, per category of ``categories`` (dataset ids,
    in that order) the sum of matched IoUs, TP, FP and FN.

    Args:
        gt_ids, pred_ids: (H, W) segment-id maps, 0 = void.
        gt_segments: ground-truth ``segments_info`` (``id``, ``category_id``, ``iscrowd``).
        pred_segments: predicted ``segments_info`` (``id``, ``category_id``).
        categories: the dataset's category ids; a segment of another category is an error.
        source: names the image in errors.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"{source}: prediction {pred_ids.shape} and ground truth "
                         f"{gt_ids.shape} differ in size")
    index = {int(c): i for i, c in enumerate(categories)}
    stats = np.zeros((len(index), 4), np.float64)
    gt_area, pred_area = segment_areas(gt_ids), segment_areas(pred_ids)
    check_segment_ids(gt_area, gt_segments, f"{source} (ground truth)")
    check_segment_ids(pred_area, pred_segments, f"{source} (prediction)")
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): s for s in pred_segments}
    for kind, segs in (("ground truth", gt), ("prediction", pred)):
        for s in segs.values():
            if int(s["category_id"]) not in index:
                raise PanopticFormatError(f"{source} ({kind}): segment {s['id']} has unknown "
                                          f"category_id {s['category_id']}")
    # intersections of every (gt id, pred id) pair present
    pairs, counts = np.unique(gt_ids.astype(np.int64) * _OFFSET + pred_ids.astype(np.int64),
                              return_counts=True)
    inter = {(int(p // _OFFSET), int(p % _OFFSET)): int(c) for p, c in zip(pairs, counts)}

    gt_matched, pred_matched = set(), set()
    for (g, p), n in inter.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0):
            continue
        cat = int(gt[g]["category_id"])
        if cat != int(pred[p]["category_id"]):
            continue
        union = pred_area[p] + gt_area[g] - n - inter.get((VOID, p), 0)
        iou = n / union
        if iou > 0.5:
            stats[index[cat], 0] += iou
            stats[index[cat], 1] += 1
            gt_matched.add(g)
            pred_matched.add(p)

    crowd: Dict[int, List[int]] = {}  # category -> its crowd segments
    for g, s in gt.items():
        if s.get("iscrowd", 0):
            crowd.setdefault(int(s["category_id"]), []).append(g)
        elif g not in gt_matched:
            stats[index[int(s["category_id"])], 3] += 1
    for p, s in pred.items():
        if p in pred_matched:
            continue
        cat = int(s["category_id"])
        ignored = inter.get((VOID, p), 0) + sum(inter.get((g, p), 0) for g in crowd.get(cat, []))
        if ignored / pred_area[p] > 0.5:
            continue
        stats[index[cat], 2] += 1
    return stats


def pq_from_stats(stats: np.ndarray, isthing: Sequence[bool],
                  names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """``(C, 4)`` summed statistics -> PQ, SQ, RQ (0-100) over all categories, things
    (``_th``) and stuff (``_st``), the number of categories counted in each (``n``, ``n_th``,
    ``n_st``) and per category ``PQ-<name>`` / ``SQ-<name>`` / ``RQ-<name>`` (NaN for a category
    without any segment). A group without any counted category gets NaN."""
    iou, tp, fp, fn = (stats[:, i] for i in range(4))
    denom = tp + 0.5 * fp + 0.5 * fn
    valid = denom > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        pq = np.where(valid, iou / np.where(valid, denom, 1), np.nan)
        sq = np.where(valid, np.where(tp > 0, iou / np.maximum(tp, 1), 0.0), np.nan)
        rq = np.where(valid, tp / np.where(valid, denom, 1), np.nan)
    thing = np.asarray(isthing, bool)
    res: Dict[str, float] = {}
    for suffix, sel in (("", np.ones_like(thing)), ("_th", thing), ("_st", ~thing)):
        use = sel & valid
        n = int(use.sum())
        for key, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            res[key + suffix] = 100 * float(values[use].mean()) if n else math.nan
        res["n" + suffix] = float(n)
    names = list(names) if names is not None else [str(i) for i in range(len(thing))]
    for i, name in enumerate(names):
        res[f"PQ-{name}"] = 100 * float(pq[i])
        res[f"SQ-{name}"] = 100 * float(sq[i])
        res[f"RQ-{name}"] = 100 * float(rq[i])
    return res


class PanopticEvaluator:
    """PQ over a dataset (see the module doc); the engine's evaluator interface.

    ``process(inputs, outputs)``: ``inputs[i]`` carries the ground truth, ``pan_seg_file_name``
    (a COCO panoptic PNG) and ``segments_info`` (dataset category ids, ``iscrowd``);
    ``outputs[i]`` the prediction, ``panoptic_seg`` ``(H, W)`` ids and ``segments_info``
    whose ``category_id`` is the model's: a thing's contiguous class (``isthing`` True) or a
    stuff class's semantic label 1..S (0 is the semantic branch's "things" class).

    Args:
        categories: the dataset's categories, dicts with ``id``, ``name``, ``isthing``.
        thing_ids: dataset id of each contiguous thing class.
        stuff_ids: dataset id of each stuff class, for semantic labels 1..S.
        output_dir: when given, the predictions are written there in COCO panoptic format
            (``predictions.json`` and ``predictions/<image>.png``).
    """

    def __init__(self, *, categories: Sequence[Mapping[str, Any]], thing_ids: Sequence[int],
                 stuff_ids: Sequence[int], dataset_name: Optional[str] = None,
                 output_dir: Optional[Path] = None) -> None:
        self.category_ids = [int(c["id"]) for c in categories]
        self.names = [str(c.get("name", c["id"])) for c in categories]
        self.isthing = [bool(c.get("isthing", 0)) for c in categories]
        self.thing_ids, self.stuff_ids = [int(i) for i in thing_ids], [int(i) for i in stuff_ids]
        missing = sorted(set(self.thing_ids + self.stuff_ids) - set(self.category_ids))
        if missing:
            raise ValueError(f"thing/stuff ids {missing} are not among the categories")
        self.dataset_name = dataset_name
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.reset()

    @classmethod
    def from_dataset(cls, dataset_name: str, **kwargs: Any) -> PanopticEvaluator:
        """Categories and id maps from the dataset's metadata (a COCO panoptic dataset)."""
        from detection.data.catalog import get_metadata

        meta = get_metadata(dataset_name)
        if "panoptic_categories" not in meta:
            raise ValueError(f"dataset {dataset_name!r} is not a COCO panoptic dataset (its "
                             "metadata has no panoptic_categories)")
        return cls(categories=meta["panoptic_categories"],
                   thing_ids=meta["contiguous_id_to_dataset_id"],
                   stuff_ids=meta["stuff_dataset_ids"], dataset_name=dataset_name, **kwargs)

    def reset(self) -> None:
        self.stats = np.zeros((len(self.category_ids), 4), np.float64)
        self.num_images = 0
        self.predictions: List[Dict[str, Any]] = []

    def to_dataset_ids(self, segments_info: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """The model's segments_info with dataset category ids (as COCO panoptic json)."""
        out = []
        for s in segments_info:
            c = int(s["category_id"])
            if s.get("isthing", False):
                cat = self.thing_ids[c]
            else:
                if not 1 <= c <= len(self.stuff_ids):
                    raise ValueError(f"stuff segment {s['id']} has semantic label {c}; stuff "
                                     f"labels are 1..{len(self.stuff_ids)} (0 is 'things')")
                cat = self.stuff_ids[c - 1]
            seg = {"id": int(s["id"]), "category_id": cat, "iscrowd": 0}
            if "score" in s:
                seg["score"] = float(s["score"])
            out.append(seg)
        return out

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            if "pan_seg_file_name" not in inp or "segments_info" not in inp:
                raise KeyError("PanopticEvaluator needs 'pan_seg_file_name' and 'segments_info' "
                               f"in each input (a panoptic dataset's mapper); got {list(inp)}")
            source = str(inp["pan_seg_file_name"])
            gt_ids = read_panoptic_png(source)
            pred_ids = np.asarray(out["panoptic_seg"].cpu().numpy() if hasattr(
                out["panoptic_seg"], "cpu") else out["panoptic_seg"], dtype=np.int64)
            pred_segments = self.to_dataset_ids(out["segments_info"])
            self.stats += pq_stats(gt_ids, inp["segments_info"], pred_ids, pred_segments,
                                   self.category_ids, source=source)
            self.num_images += 1
            if self.output_dir is not None:
                self._save(inp, pred_ids, pred_segments)

    def _save(self, inp: Mapping[str, Any], ids: np.ndarray,
              segments: List[Dict[str, Any]]) -> None:
        folder = self.output_dir / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(str(inp["pan_seg_file_name"])).stem + ".png"
        write_panoptic_png(folder / name, ids)
        areas = segment_areas(ids)
        for s in segments:
            s["area"] = areas.get(s["id"], 0)
        self.predictions.append({"image_id": inp.get("image_id"), "file_name": name,
                                 "segments_info": segments_to_json(segments)})

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """{"panoptic_seg": metrics} on the main process (statistics summed over ranks); {} on
        the others."""
        stats = torch.from_numpy(self.stats)
        predictions = self.predictions
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) \
                if backend == "nccl" else torch.device("cpu")
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
            if self.output_dir is not None:
                gathered: List[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, predictions)
                predictions = [p for part in gathered for p in part]
            if dist.get_rank() != 0:
                return {}
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cats = [{"id": i, "name": n, "isthing": int(t)}
                    for i, n, t in zip(self.category_ids, self.names, self.isthing)]
            (self.output_dir / "predictions.json").write_text(json.dumps(
                {"annotations": predictions, "categories": cats}))
        return {"panoptic_seg": pq_from_stats(stats.numpy(), self.isthing, self.names)}
