"""COCO box/mask AP with pycocotools, from model outputs in input-image pixels.

Scale: the returned metrics are percentages (0-100), as detectron2 reports them; ``AP`` of
perfect detections is 100.0. A metric pycocotools cannot compute (it gives -1, e.g. no ground
truth in that area range, or a category without ground truth) is reported as NaN.

At scale: each rank's predictions reach rank 0 in chunks (:data:`GATHER_CHUNK` images a
message), results json files are written in one streaming pass, atomically
(:func:`write_results_json`), and neither results nor ground truth are deep-copied.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.atomic_files import atomic_write
from detection.modeling.metadata import to_dataset_ids

__all__ = [
    "COCOEvaluator",
    "STAT_NAMES",
    "coco_stats_to_metrics",
    "detections_to_coco_results",
    "format_per_category_table",
    "gather_to_rank0",
    "write_coco_submission",
    "write_results_json",
]

logger = logging.getLogger(__name__)

# The 12 numbers of COCOeval.stats, in order.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# The 10 numbers of COCOeval.stats for keypoints (OKS), in order.
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco_results(
    image_id: int,
    output: dict[str, Any],
    contiguous_id_to_dataset_id: Sequence[int],
    *,
    with_masks: bool = True,
    with_keypoints: bool = True,
) -> list[dict[str, Any]]:
    """One image's model output -> COCO results entries.

    ``output``: ``boxes`` (N, 4) xyxy in input-image pixels, ``scores`` (N,), ``labels`` (N,)
    contiguous, and optionally ``masks`` (N, H, W) bool/uint8, or float probabilities
    (thresholded at 0.5), or (N, 1, H, W). Entries carry the dataset's category ids, xywh
    boxes, (with masks) RLE ``segmentation`` with str counts and (with ``keypoints`` (N, K, 3)
    in the output) COCO's flat ``keypoints`` ``[x, y, v] * K``.
    """
    boxes = _numpy(output["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(output["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(output["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"image {image_id}: boxes {boxes.shape}, scores {scores.shape}, labels {labels.shape}"
        )
    try:
        category_ids = to_dataset_ids(labels, contiguous_id_to_dataset_id)
    except ValueError as e:
        raise ValueError(f"image {image_id}: {e}") from None
    rles = None
    if with_masks and output.get("masks") is not None:
        masks = _numpy(output["masks"])
        if masks.ndim == 4:
            masks = masks[:, 0]
        if masks.dtype.kind == "f":
            masks = masks >= 0.5
        masks = np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0))  # (H, W, N)
        rles = mask_util.encode(masks) if masks.shape[2] else []
        for r in rles:
            r["counts"] = r["counts"].decode("ascii")
    keypoints = None
    if with_keypoints and output.get("keypoints") is not None:
        # (N, K * 3); an image without detections has none (and an unknown K)
        keypoints = _numpy(output["keypoints"]).astype(np.float64).reshape(len(boxes), -1) \
            if len(boxes) else None
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    results = []
    for i in range(len(boxes)):
        entry: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": category_ids[i],
            "bbox": [round(float(v), 3) for v in xywh[i]],
            "score": round(float(scores[i]), 5),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        if keypoints is not None:
            entry["keypoints"] = [round(float(v), 3) for v in keypoints[i]]
        results.append(entry)
    return results


def coco_stats_to_metrics(stats: Iterable[float],
                          names: Sequence[str] = STAT_NAMES) -> dict[str, float]:
    """COCOeval.stats (0-1, -1 for undefined) -> {name: percentage or NaN}."""
    return {n: (float(s) * 100.0 if s >= 0 else math.nan) for n, s in zip(names, stats)}


def format_per_category_table(per_category: dict[str, float], columns: int = 3) -> str:
    """A plain-text table of ``{class name: AP}``, ``columns`` pairs per row."""
    cells = [(name, "nan" if math.isnan(ap) else f"{ap:.3f}") for name, ap in per_category.items()]
    if not cells:
        return ""
    wn = max(len("category"), *(len(c[0]) for c in cells))
    wa = max(len("AP"), *(len(c[1]) for c in cells))
    header = " | ".join([f"{'category':<{wn}} | {'AP':>{wa}}"] * min(columns, len(cells)))
    lines = [header, "-" * len(header)]
    for i in range(0, len(cells), columns):
        row = cells[i : i + columns]
        lines.append(" | ".join(f"{n:<{wn}} | {a:>{wa}}" for n, a in row))
    return "\n".join(lines)


EVAL_ENGINES = ("auto", "pycocotools", "faster_coco_eval")


def resolve_engine(engine: str) -> str:
    """The COCO evaluation engine to use. ``"auto"`` takes faster-coco-eval (the same
    algorithm in C++, 5-10x faster; its 12 stats equal pycocotools', which a test checks)
    when it is installed, else pycocotools, the reference."""
    if engine not in EVAL_ENGINES:
        raise ValueError(f"unknown COCO evaluation engine {engine!r}; valid: {EVAL_ENGINES}")
    if engine == "pycocotools":
        return engine
    try:
        _faster_cocoeval()
    except ImportError:
        if engine == "faster_coco_eval":
            raise ImportError("engine 'faster_coco_eval' needs `pip install faster-coco-eval`")\
                from None
        return "pycocotools"
    return "faster_coco_eval"


def _faster_cocoeval() -> Any:
    from faster_coco_eval import COCOeval_faster

    return COCOeval_faster


def _shallow(entries: Iterable[dict]) -> list[dict]:
    """Copies of the entries' dicts, sharing their values (polygons, RLEs): evaluation adds
    keys to them (``ignore``, an int ``id``), and must not add them to the caller's."""
    return [dict(e) for e in entries]


def _empty_results_coco(gt: Any) -> Any:
    dt = type(gt)()
    dt.dataset = {
        "images": _shallow(gt.dataset["images"]),
        "categories": _shallow(gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


class COCOEvaluator:
    """Accumulate detections over a dataset, then compute COCO AP with pycocotools.

    ``dataset``: a registered dataset name, or ``(gt, metadata)`` where gt is a COCO json path
    or a ``pycocotools.coco.COCO`` and metadata a dict with ``contiguous_id_to_dataset_id`` (and
    optionally ``thing_classes``), or None to derive it from gt's categories (sorted by id).

    Only the images passed to :meth:`process` are evaluated (``params.imgIds``); images with no
    detections count as such. With ``distributed`` and torch.distributed initialized, results
    are gathered to rank 0 (others return {}); duplicates of an image id are dropped.
    """

    def __init__(
        self,
        dataset: str | tuple[str | os.PathLike | COCO, dict[str, Any] | None],
        tasks: Sequence[str] = ("bbox",),
        output_dir: str | os.PathLike | None = None,
        distributed: bool = True,
        engine: str = "auto",
        kpt_oks_sigmas: Sequence[float] | None = None,
    ) -> None:
        for t in tasks:
            if t not in ("bbox", "segm", "keypoints"):
                raise ValueError(f"Unsupported task {t!r}; use 'bbox', 'segm' and/or "
                                 "'keypoints'")
        # per-keypoint OKS sigmas; None: pycocotools' default, COCO's 17 person keypoints
        self.kpt_oks_sigmas = None if kpt_oks_sigmas is None else np.asarray(kpt_oks_sigmas,
                                                                             np.float64)
        if isinstance(dataset, str):
            from detection.data.catalog import get_metadata

            metadata = get_metadata(dataset)
            if "json_file" not in metadata:
                raise ValueError(f"Dataset '{dataset}' has no json_file in its metadata")
            gt: str | os.PathLike | COCO = metadata["json_file"]
        else:
            gt, metadata = dataset
        if isinstance(gt, COCO):
            self.coco_gt = gt
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco_gt = COCO(os.fspath(gt))
        if metadata is None or "contiguous_id_to_dataset_id" not in metadata:
            from detection.data.coco import metadata_from_categories

            metadata = {
                **(metadata or {}),
                **metadata_from_categories(self.coco_gt.dataset.get("categories", [])),
            }
        self.metadata = metadata
        self.tasks = tuple(tasks)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.distributed = distributed
        self.engine = resolve_engine(engine)
        self.coco_eval: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self._predictions: list[dict[str, Any]] = []

    def use_model_classes(self, metadata: Any) -> None:
        """Map labels back to dataset ids through the model's own metadata (the checkpoint's
        ``category_ids``) instead of the dataset's table, after checking that each of the
        model's (id, name) pairs is a category of the ground truth (torchvision's "N/A"
        outputs excepted); a ValueError names every pair that is not."""
        names = {int(c["id"]): str(c["name"])
                 for c in self.coco_gt.dataset.get("categories", [])}
        wrong = [f"label {k}: model ({i}, {n!r}) / dataset "
                 + (f"({i}, {names[int(i)]!r})" if int(i) in names else f"has no id {i}")
                 for k, (i, n) in enumerate(zip(metadata.category_ids, metadata.class_names))
                 if n != "N/A" and names.get(int(i)) != n]
        if wrong:
            raise ValueError(f"the model's classes disagree with the categories of "
                             f"{self.metadata.get('json_file', 'the ground truth')}: "
                             + "; ".join(wrong[:10])
                             + (f"; {len(wrong) - 10} more" if len(wrong) > 10 else ""))
        self.metadata = {**self.metadata,
                         "contiguous_id_to_dataset_id": list(metadata.category_ids)}

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Add one batch: mapper dicts (with ``image_id``) and the model's per-image outputs."""
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        ids = self.metadata["contiguous_id_to_dataset_id"]
        for inp, out in zip(inputs, outputs):
            self._predictions.append(
                {
                    "image_id": int(inp["image_id"]),
                    "results": detections_to_coco_results(
                        inp["image_id"], out, ids, with_masks="segm" in self.tasks,
                        with_keypoints="keypoints" in self.tasks,
                    ),
                }
            )

    def _gather(self) -> list[dict[str, Any]] | None:
        """Every rank's predictions in rank order, one per image id, on rank 0; None elsewhere."""
        parts: list[list[dict[str, Any]]] | None = [self._predictions]
        if self.distributed and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            parts = gather_to_rank0(self._predictions, chunk=GATHER_CHUNK)
            if parts is None:
                return None
        seen, unique = set(), []
        for part in parts:
            for p in part:  # padded or repeated shards: keep one copy per image
                if p["image_id"] not in seen:
                    seen.add(p["image_id"])
                    unique.append(p)
        return unique

    def evaluate(self) -> dict[str, dict[str, float]]:
        """{task: {"AP", "AP50", ..., "ARl", "AP-<class>"}} on a 0-100 scale; {} off rank 0."""
        preds = self._gather()
        if preds is None:
            return {}
        results = [r for p in preds for r in p["results"]]
        img_ids = sorted(p["image_id"] for p in preds)
        unknown = set(img_ids) - set(self.coco_gt.getImgIds())
        if unknown:
            raise ValueError(f"image ids not in the ground truth: {sorted(unknown)[:10]}")
        if self.output_dir is not None:  # written even when no image could be read
            path = self.output_dir / "coco_instances_results.json"
            write_results_json(path, results)
            logger.info("Wrote %d detections to %s", len(results), path)
        if not preds:
            logger.warning("COCOEvaluator: no images were processed; no AP to report")
            return {}
        return {task: self._evaluate_task(task, results, img_ids) for task in self.tasks}

    def _faster_gt(self) -> Any:
        """The ground truth indexed by faster-coco-eval (built once, from the same dict)."""
        if getattr(self, "_fast_gt", None) is None:
            from faster_coco_eval import COCO as FastCOCO

            ds = self.coco_gt.dataset
            dataset = {**ds, "images": _shallow(ds["images"]),
                       "annotations": _shallow(ds.get("annotations", [])),
                       "categories": _shallow(ds.get("categories", []))}
            with contextlib.redirect_stdout(io.StringIO()):
                self._fast_gt = FastCOCO(dataset)
        return self._fast_gt

    def _evaluate_task(
        self, task: str, results: list[dict[str, Any]], img_ids: list[int]
    ) -> dict[str, float]:
        # loadRes adds keys to each entry (area, id, a box's polygon): shallow copies keep the
        # results as they were for the next task, without copying boxes and masks
        if task == "segm":  # without "bbox", else loadRes takes them as box results
            task_results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        elif task == "keypoints":  # the box stays: its area ranks unmatched detections
            task_results = [dict(r) for r in results if "keypoints" in r]
        else:
            task_results = [dict(r) for r in results]
        gt, evaluator_cls = self.coco_gt, COCOeval
        if self.engine == "faster_coco_eval" and task != "keypoints":  # OKS: pycocotools
            gt, evaluator_cls = self._faster_gt(), _faster_cocoeval()
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(task_results) if task_results else _empty_results_coco(gt)
        ev = evaluator_cls(gt, dt, iouType=task)
        ev.params.imgIds = img_ids
        if task == "keypoints" and self.kpt_oks_sigmas is not None:
            ev.params.kpt_oks_sigmas = self.kpt_oks_sigmas
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        logger.info("COCO %s evaluation:\n%s", task, buf.getvalue())
        self.coco_eval[task] = ev
        metrics = coco_stats_to_metrics(
            ev.stats, KEYPOINT_STAT_NAMES if task == "keypoints" else STAT_NAMES)

        # precision: (T iou thresholds, R recall points, K categories, A areas, M maxDets)
        precision = ev.eval["precision"]
        cats = self.coco_gt.loadCats(ev.params.catIds)
        per_category: dict[str, float] = {}
        for k, cat in enumerate(cats):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_category[str(cat.get("name", cat["id"]))] = (
                float(np.mean(p)) * 100.0 if p.size else math.nan
            )
        logger.info("Per-category %s AP:\n%s", task, format_per_category_table(per_category))
        metrics.update({f"AP-{name}": ap for name, ap in per_category.items()})
        return metrics


def write_coco_submission(
    results: Iterable[dict[str, Any]],
    output_dir: str | os.PathLike,
    *,
    split: str = "test-dev2017",
    alg: str = "detkit",
    kind: str = "detections",
) -> Path:
    """Write ``results`` as the COCO server expects: ``{kind}_{split}_{alg}_results.json`` zipped.

    ``split`` is ``"test-dev2017"`` or ``"val2017"``; ``alg`` may not contain ``_``. Returns the
    zip's path (the json sits beside it).
    """
    if split not in ("test-dev2017", "val2017", "test-challenge2017"):
        raise ValueError(f"split must be 'test-dev2017' or 'val2017', got {split!r}")
    if "_" in alg or not alg:
        raise ValueError(f"alg must be a non-empty name without '_', got {alg!r}")
    out = Path(output_dir)
    name = f"{kind}_{split}_{alg}_results.json"
    json_path = out / name
    write_results_json(json_path, results)
    zip_path = out / (json_path.stem + ".zip")

    def write_zip(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(json_path, arcname=name)  # read from the file in blocks

    atomic_write(zip_path, write_zip)
    return zip_path


def write_results_json(path: str | os.PathLike, results: Iterable[dict[str, Any]], *,
                       batch: int = 2048) -> int:
    """Write ``results`` to ``path`` as one json list, the same text as ``json.dump`` gives,
    in one pass: ``batch`` entries are encoded and written at a time (no string of the whole
    file is built). Atomic (a crash leaves the previous file or none). Returns the count."""
    encode = json.JSONEncoder().encode  # json.dump's defaults
    count = 0

    def write(f: IO[str]) -> None:
        chunk: list[dict[str, Any]] = []

        def flush() -> None:
            nonlocal count
            # "[e1, e2]" without its brackets: the entries as json.dump separates them
            f.write((", " if count else "") + encode(chunk)[1:-1])
            count += len(chunk)
            chunk.clear()

        f.write("[")
        for entry in results:
            chunk.append(entry)
            if len(chunk) == batch:
                flush()
        if chunk:
            flush()
        f.write("]")

    atomic_write(path, write, binary=False)
    return count


# Images per message when predictions are gathered to rank 0: the serialized form of one
# round (a chunk from every rank) is what rank 0 holds besides the predictions themselves.
GATHER_CHUNK = 500


def gather_to_rank0(items: list[Any], *, chunk: int = GATHER_CHUNK) -> list[list[Any]] | None:
    """Each rank's ``items`` on rank 0, one list per rank in rank order (None on the others).

    Sent in rounds of ``chunk`` items per rank with ``gather_object`` (to rank 0 only, not to
    every rank as ``all_gather_object`` does); rank 0 keeps its own list as it is, adds each
    round to the lists and drops the round's buffers before the next."""
    world, rank = dist.get_world_size(), dist.get_rank()
    counts: list[Any] = [None] * world
    dist.all_gather_object(counts, len(items))
    rounds = max(math.ceil(int(n) / chunk) for n in counts)
    parts: list[list[Any]] | None = None
    if rank == 0:
        parts = [list(items)] + [[] for _ in range(world - 1)]
    for k in range(rounds):
        piece = [] if rank == 0 else items[k * chunk:(k + 1) * chunk]
        box: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(piece, box, dst=0)
        if parts is not None and box is not None:
            for r in range(1, world):
                parts[r].extend(box[r])
        del box, piece
    return parts
