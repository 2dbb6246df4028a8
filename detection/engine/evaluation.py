"""Evaluating a model on the test datasets of its config: the inference loop (which skips
images the loader could not read, and counts them) and the per-dataset evaluation."""

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from detection.families import get_family

from . import distributed as du
from .result_tables import format_ap_line

__all__ = ["ImageCounts", "build_evaluator", "dataset_dir_name", "evaluate",
           "inference_on_dataset"]

logger = logging.getLogger("detection.train")


@dataclass
class ImageCounts:
    """The images of one evaluation pass: how many were read and evaluated, how many could
    not be read (each counted once), and the file names of those the loader named."""

    read: int = 0
    unreadable: int = 0
    unreadable_files: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.read + self.unreadable


def _expected_images(data_loader: Iterable) -> Optional[int]:
    """How many images this rank's loader was asked for (None when it cannot say)."""
    sampler = getattr(data_loader, "sampler", None)
    batch_size = getattr(data_loader, "batch_size", None)
    if sampler is None or batch_size is None or not hasattr(sampler, "__len__"):
        return None
    return len(sampler)


def _gather_counts(counts: ImageCounts) -> ImageCounts:
    if du.get_world_size() == 1:
        return counts
    parts = du.all_gather_object(counts)
    return ImageCounts(read=sum(c.read for c in parts),
                       unreadable=sum(c.unreadable for c in parts),
                       unreadable_files=[f for c in parts for f in c.unreadable_files])


def inference_on_dataset(model: nn.Module, data_loader: Iterable, evaluator: Any) -> Dict[str, Any]:
    """Run ``model`` over ``data_loader`` (this rank's shard) and return
    ``evaluator.evaluate()`` (gathered over ranks; {} off the main process).

    A batch is a list of mapped images. The loader drops images it could not read (with
    ``DATALOADER.SKIP_MISSING_IMAGES``); a batch may say which, as ``batch.unreadable`` (file
    names) and ``batch.num_unreadable``. A batch left empty is never given to the model. The
    number of unreadable images (from the batches, else the sampler's length minus the images
    read; plus the records the data check left out, ``data_loader.left_out``) goes into every
    task's metrics as ``images_read`` / ``images_unreadable``; the metrics cover the images
    read.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    evaluator.reset()
    counts = ImageCounts()
    batches_say = False
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(data_loader, desc="eval", disable=not du.is_main_process(),
                          dynamic_ncols=True):
            if hasattr(batch, "unreadable") or hasattr(batch, "num_unreadable"):
                batches_say = True
                names = [str(n) for n in getattr(batch, "unreadable", [])]
                counts.unreadable += int(getattr(batch, "num_unreadable", len(names)))
                counts.unreadable_files += names
            if len(batch) == 0:  # every image of this batch failed to load
                continue
            device = getattr(model, "device", None) or next(model.parameters()).device
            outputs = model([d["image"].to(device) for d in batch])
            # tensors to the CPU; other values (a panoptic model's segments_info) as they are
            outputs = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in o.items()}
                       for o in outputs]
            evaluator.process(batch, outputs)
            counts.read += len(batch)
    elapsed = time.perf_counter() - start
    expected = _expected_images(data_loader)
    if not batches_say and expected is not None:
        counts.unreadable = max(expected - counts.read, 0)
    logger.info("Inference on %d images took %.1f s (%.3f s / image on this rank)", counts.read,
                elapsed, elapsed / max(counts.read, 1))
    counts = _gather_counts(counts)
    left_out = [str(f) for f in getattr(data_loader, "left_out", [])]  # by the data check
    counts.unreadable += len(left_out)  # the same list on every rank: counted once
    counts.unreadable_files = left_out + counts.unreadable_files
    if counts.unreadable:
        shown = ", ".join(counts.unreadable_files[:10])
        logger.warning("%d of %d images could not be read and are left out of the evaluation%s",
                       counts.unreadable, counts.total, f": {shown}" if shown else "")
    results = evaluator.evaluate()
    for metrics in results.values():
        if isinstance(metrics, dict):
            metrics["images_read"] = float(counts.read)
            metrics["images_unreadable"] = float(counts.unreadable)
    model.train(was_training)
    return results


def dataset_dir_name(name: str) -> str:
    """A folder name for a dataset name (``JSON_FILE:IMAGE_DIR`` names become the json's stem)."""
    if ":" in name and name.rpartition(":")[0].endswith(".json"):
        name = Path(name.rpartition(":")[0]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def build_evaluator(cfg: Any, dataset_name: str, output_dir: Optional[Path] = None) -> Any:
    """The evaluator of ``cfg``'s model family for ``dataset_name``."""
    return get_family(cfg).build_evaluator(cfg, dataset_name, output_dir)


def evaluate(cfg: Any, model: nn.Module) -> Dict[str, Any]:
    """Evaluate ``model`` on every dataset of ``cfg.DATASETS.TEST`` with its family's mapper
    and evaluator; results and predictions go to ``OUTPUT_DIR/inference/<dataset>/``.
    Returns ``{task: metrics}`` for one dataset, ``{dataset: {task: metrics}}`` for several."""
    from detection.data.build import build_test_loader

    family = get_family(cfg)
    unwrapped = getattr(model, "module", model)
    results: Dict[str, Any] = {}
    for name in cfg.DATASETS.TEST:
        loader = build_test_loader(cfg, name, mapper=family.build_mapper(cfg, False))
        out_dir = Path(cfg.OUTPUT_DIR) / "inference" / dataset_dir_name(name)
        evaluator = family.build_evaluator(cfg, name, out_dir)
        meta = getattr(unwrapped, "metadata", None)
        if hasattr(evaluator, "use_model_classes") and not getattr(meta, "is_placeholder", True):
            evaluator.use_model_classes(meta)  # the checkpoint's ids, checked against the json
        res = inference_on_dataset(unwrapped, loader, evaluator)
        if du.is_main_process():
            for task, metrics in res.items():
                logger.info("%s %s: %s", name, task, format_ap_line(metrics))
        results[name] = res
    du.synchronize()
    return results if len(results) != 1 else next(iter(results.values()))
