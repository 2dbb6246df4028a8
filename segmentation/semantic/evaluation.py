"""Semantic segmentation metrics from one dataset-level confusion matrix.

``SemSegEvaluator`` accumulates a ``(K, K)`` matrix (rows: ground truth, columns: prediction)
over every processed image with ``torch.bincount``, skipping pixels labelled ``ignore_label``.
``evaluate()`` sums the matrix over torch.distributed ranks (``all_reduce``) and reports, on a
0-100 scale like the COCO evaluator, under the task ``"sem_seg"``::

    mIoU     mean over classes of TP / (TP + FP + FN); classes whose union (TP + FP + FN) is
             empty in the whole dataset are left out of the mean
    fwIoU    IoU weighted by each class's ground-truth pixel share
    mACC     mean over classes present in the ground truth of TP / (TP + FN)
    pACC     correctly labelled pixels / labelled pixels
    IoU-<name>, ACC-<name>   per class (NaN where undefined)
"""

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["SemSegEvaluator", "confusion_matrix", "metrics_from_confusion"]


def confusion_matrix(pred: Tensor, gt: Tensor, num_classes: int, ignore_label: int) -> Tensor:
    """pred, gt: integer maps of equal shape -> int64 (K, K) counts, ``[gt, pred]``.

    Pixels with ``gt == ignore_label`` are skipped. A ground-truth value outside 0..K-1 (other
    than the ignore label) or a prediction outside 0..K-1 raises ValueError.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} "
                         "differ in shape")
    gt = gt.reshape(-1).to(torch.int64)
    pred = pred.reshape(-1).to(torch.int64)
    keep = gt != ignore_label
    gt, pred = gt[keep], pred[keep]
    bad = (gt < 0) | (gt >= num_classes)
    if bool(bad.any()):
        values = sorted(int(v) for v in torch.unique(gt[bad])[:10])
        raise ValueError(f"ground-truth labels {values} are outside 0..{num_classes - 1} and "
                         f"are not the ignore label {ignore_label}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predicted labels must lie in 0..{num_classes - 1}")
    return torch.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes)


def metrics_from_confusion(
    matrix: Tensor, class_names: Optional[Sequence[str]] = None
) -> Dict[str, float]:
    """(K, K) ``[gt, pred]`` counts -> mIoU, fwIoU, mACC, pACC and per-class IoU / ACC (0-100).

    A class whose union is empty (never in the ground truth, never predicted) has no IoU and is
    left out of mIoU; one absent from the ground truth has no accuracy.
    """
    m = matrix.to(torch.float64)
    k = m.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    tp = m.diag()
    gt_count, pred_count = m.sum(1), m.sum(0)
    union = gt_count + pred_count - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt_count > 0, tp / gt_count.clamp(min=1), torch.full_like(tp, math.nan))
    total = float(gt_count.sum())
    valid_iou, valid_acc = union > 0, gt_count > 0
    res = {
        "mIoU": 100 * float(iou[valid_iou].mean()) if bool(valid_iou.any()) else math.nan,
        "fwIoU": 100 * float((iou[valid_acc] * gt_count[valid_acc]).sum() / total)
        if total > 0 else math.nan,
        "mACC": 100 * float(acc[valid_acc].mean()) if bool(valid_acc.any()) else math.nan,
        "pACC": 100 * float(tp.sum() / total) if total > 0 else math.nan,
    }
    for name, v in zip(names, iou.tolist()):
        res[f"IoU-{name}"] = 100 * v
    for name, v in zip(names, acc.tolist()):
        res[f"ACC-{name}"] = 100 * v
    return res


def _read_label_file(path: str) -> Tensor:
    from .data import read_label_map

    return torch.from_numpy(read_label_map(path).astype(np.int64))


class SemSegEvaluator:
    """Accumulates one confusion matrix over a dataset; see the module docstring.

    ``process(inputs, outputs)`` takes the mapper dicts and the model's outputs: the prediction
    is ``outputs[i]["sem_seg"].argmax(0)`` (logits ``(K, H, W)``), or ``outputs[i]["sem_seg"]``
    itself when it is already an integer (H, W) map. The ground truth is ``inputs[i]["sem_seg"]``
    or, without it, the label file ``inputs[i]["sem_seg_file_name"]``.
    """

    def __init__(
        self, *, num_classes: int, ignore_label: int = 255,
        class_names: Optional[Sequence[str]] = None, dataset_name: Optional[str] = None,
        output_dir: Optional[Path] = None,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.ignore_label = int(num_classes), int(ignore_label)
        self.class_names = list(class_names) if class_names is not None else None
        self.dataset_name, self.output_dir = dataset_name, output_dir
        self.reset()

    @classmethod
    def from_dataset(cls, dataset_name: str, **kwargs: Any) -> "SemSegEvaluator":
        """Classes and ignore label from the dataset's metadata (``stuff_classes``,
        ``ignore_label``; COCO datasets: background + ``thing_classes``)."""
        from detection.data.catalog import get_metadata

        meta = get_metadata(dataset_name)
        names = meta.get("stuff_classes") or ["background", *meta.get("thing_classes", [])]
        return cls(num_classes=len(names), class_names=names,
                   ignore_label=int(meta.get("ignore_label", 255)), dataset_name=dataset_name,
                   **kwargs)

    def reset(self) -> None:
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.num_images = 0

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Tensor]]) -> None:
        for inp, out in zip(inputs, outputs):
            pred = out["sem_seg"]
            if pred.is_floating_point():
                if pred.dim() != 3 or pred.shape[0] != self.num_classes:
                    raise ValueError(f"expected logits ({self.num_classes}, H, W), got "
                                     f"{tuple(pred.shape)}")
                pred = pred.argmax(0)
            gt = inp.get("sem_seg")
            if gt is None:
                if "sem_seg_file_name" not in inp:
                    raise KeyError("SemSegEvaluator needs 'sem_seg' or 'sem_seg_file_name' in "
                                   f"each input; got keys {list(inp)}")
                gt = _read_label_file(inp["sem_seg_file_name"])
            try:
                self.matrix += confusion_matrix(pred.cpu(), gt.cpu(), self.num_classes,
                                                self.ignore_label)
            except ValueError as e:
                where = inp.get("sem_seg_file_name") or inp.get("file_name", "?")
                raise ValueError(f"{where}: {e}") from e
            self.num_images += 1

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """{"sem_seg": metrics} on the main process (the matrix summed over ranks); {} on the
        others."""
        matrix = self.matrix
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) \
                if backend == "nccl" else torch.device("cpu")
            matrix = matrix.to(device)
            dist.all_reduce(matrix)
            matrix = matrix.cpu()
            if dist.get_rank() != 0:
                return {}
        return {"sem_seg": metrics_from_confusion(matrix, self.class_names)}
