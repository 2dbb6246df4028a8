"""The data check: every record's image and annotations, before training and evaluation.

Two depths (``DATALOADER.CHECK_DATA``):

- ``fast``: the file exists, is not empty, has a readable image header (opened, not decoded),
  and its size after EXIF orientation is the record's height/width;
- ``full``: also decodes every image exactly as the mapper will (a truncated JPEG passes the
  header test and fails here) and validates every segmentation (polygons and RLEs).

What each problem gets (the ``ACTIONS`` table; ``record`` problems make the record unusable):

==================== ======== ==============================================================
kind                 level    action
==================== ======== ==============================================================
missing_file         record   left out (SKIP_MISSING_IMAGES) or DataCheckError
empty_file           record   same
not_an_image         record   same (a text file named .jpg, an unknown format)
undecodable          record   same (``full`` only: truncated or corrupt image data)
size_mismatch        record   same: the boxes' frame is unknown, so no guess is made
no_size              record   fixed: height/width taken from the file
unknown_image        ann      skipped by the json loader (its image_id is not in the json)
unknown_category     ann      skipped by the json loader
degenerate_box       ann      skipped (zero or negative width/height)
outside_image        ann      skipped (no part inside the image)
invalid_box          ann      skipped (missing, not 4 finite numbers)
clipped              ann      fixed: clipped to the image by the json loader
invalid_annotation   ann      skipped (a record field the mapper cannot read)
invalid_segmentation ann      ``full`` only: skipped with MASK_ON, reported otherwise
==================== ======== ==============================================================

Grayscale, palette, RGBA, 16-bit, CMYK and EXIF-rotated images are converted by
:func:`~detection.data.image_io.read_image` and are not problems.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Iterable

from detection.data.annotations import annotation_box_label, validate_segmentation
from detection.data.coco import MIN_BOX_SIZE
from detection.data.errors import DatasetError, InvalidAnnotationError
from detection.data.image_io import ImageReadError, image_size, read_image
from detection.data.report import ACTIONS, DataReport, Finding

__all__ = ["ACTIONS", "DataCheckError", "DataReport", "Finding", "check_records"]

logger = logging.getLogger(__name__)

MODES = ("fast", "full", "off")
_CHUNK = 64


class DataCheckError(DatasetError):
    """Unusable records were found and skipping is off; the message is the problem table."""


def _inspect_image(path: str, full: bool) -> tuple[str | None, str, tuple[int, int] | None]:
    """(problem kind or None, detail, (height, width) after EXIF or None)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing_file", "not found", None
    except (OSError, ValueError) as e:
        return "missing_file", f"cannot stat: {e}", None
    if not os.path.isfile(path):
        return "missing_file", "not a regular file", None
    if st.st_size == 0:
        return "empty_file", "0 bytes", None
    try:
        size = image_size(path)
    except ImageReadError as e:
        return "not_an_image", str(e.__cause__ or e), None
    if full:
        try:
            image = read_image(path)
        except ImageReadError as e:
            return "undecodable", str(e.__cause__ or e), size
        size = image.shape[:2]
    return None, "", size


def _check_one(item: tuple) -> tuple[int, list[tuple], tuple[int, int] | None, list[int]]:
    """Check one record (a light tuple, picklable); see :func:`check_records`."""
    index, path, rh, rw, anns, full, mask_on = item
    findings: list[tuple] = []  # (kind, ann_id, detail)
    kind, detail, size = _inspect_image(path, full)
    if kind is not None and kind != "undecodable":
        return index, [(kind, None, detail)], None, []
    if kind == "undecodable":
        findings.append((kind, None, detail))
    h, w = size
    fix = None
    if rh is None or rw is None:
        fix = (h, w)
        findings.append(("no_size", None, f"taken from the file: {h}x{w}"))
    elif (rh, rw) != (h, w):
        findings.append(("size_mismatch", None, _mismatch_detail(path, rh, rw, h, w)))
    drop: list[int] = []
    if anns is None:  # a field 'annotations' that is not a list: none are usable
        findings.append(("invalid_annotation", None, "field 'annotations' is not a list"))
        return index, findings, fix, [0]
    for pos, ann_id, ann in anns:
        try:
            box, _ = annotation_box_label(ann, os.path.basename(path))
        except InvalidAnnotationError as e:
            findings.append(("invalid_annotation", ann_id, str(e)))
            drop.append(pos)
            continue
        x0, y0, x1, y1 = box
        if x1 - x0 < MIN_BOX_SIZE or y1 - y0 < MIN_BOX_SIZE:
            findings.append(("degenerate_box", ann_id, f"box {box}"))
        elif x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            findings.append(("outside_image", ann_id, f"box {box} in a {h}x{w} image"))
        if full and ("segmentation" in ann or (mask_on and not ann.get("iscrowd", 0))):
            try:
                if "segmentation" not in ann:  # the mask head needs one per instance
                    raise InvalidAnnotationError(f"annotation {ann_id}: no 'segmentation'")
                validate_segmentation(ann["segmentation"], h, w, ann_id=ann_id)
            except DatasetError as e:
                findings.append(("invalid_segmentation", ann_id, str(e)))
                if mask_on:
                    drop.append(pos)
    return index, findings, fix, drop


def _mismatch_detail(path: str, rh: int, rw: int, h: int, w: int) -> str:
    text = f"the file is {h}x{w} (height x width, after EXIF) but the json says {rh}x{rw}"
    if (rh, rw) == (w, h):
        try:
            raw = image_size(path, exif_transpose=False)
        except ImageReadError:
            raw = None
        if raw == (rh, rw):
            text += ("; the json has the size before EXIF rotation: its boxes may be in the "
                     "unrotated frame")
    return text


def _items(records: list[dict], full: bool, mask_on: bool) -> Iterable[tuple]:
    for i, r in enumerate(records):
        anns = r.get("annotations", [])
        light = None if not isinstance(anns, list) else [
            (p, a.get("id") if isinstance(a, dict) else None,
             a if full else {k: a[k] for k in ("id", "bbox", "category_id") if k in a}
             if isinstance(a, dict) else a) for p, a in enumerate(anns)]
        path = r.get("file_name")
        path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
        yield i, path, r.get("height"), r.get("width"), light, full, mask_on


def _chunk_check(items: list[tuple]) -> list[tuple]:
    return [_check_one(it) for it in items]


def check_records(
    records: list[dict],
    *,
    mode: str = "fast",
    mask_on: bool = False,
    name: str = "",
    workers: int | None = None,
    executor: str = "thread",
    progress: bool = True,
    load_problems: dict[str, list] | None = None,
) -> DataReport:
    """Check every record (see the module doc) on ``workers`` threads or processes.

    ``load_problems`` adds the annotations the json loader already skipped or clipped (its
    metadata's ``load_problem_ids``: kind -> annotation ids) to the report. Records are not
    modified: :meth:`DataReport.apply` returns the usable, fixed ones.
    """
    if mode not in ("fast", "full"):
        raise ValueError(f"DATALOADER.CHECK_DATA must be one of {MODES}, got {mode!r}")
    from tqdm import tqdm

    t0 = time.perf_counter()
    full = mode == "full"
    items = list(_items(records, full, mask_on))
    chunks = [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    report = DataReport(name=name, mode=mode, num_records=len(records))
    pool: Executor = (ProcessPoolExecutor(workers) if executor == "process"
                      else ThreadPoolExecutor(workers, thread_name_prefix="check_data"))
    bar = tqdm(total=len(items), desc=f"check_data {mode} {name}".strip(), unit="img",
               disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for results in pool.map(_chunk_check, chunks):
            for index, found, fix, drop in results:
                rec = records[index]
                for kind, ann_id, detail in found:
                    report.add(Finding(kind, str(rec.get("file_name")), rec.get("image_id"),
                                       ann_id, detail), index)
                if fix is not None:
                    report.fixes[index] = fix
                if drop:
                    report.dropped[index] = drop
            bar.update(len(results))
    finally:
        bar.close()
        pool.shutdown()
    for kind, ids in sorted((load_problems or {}).items()):
        for ann_id in ids:
            done = "clipped" if ACTIONS.get(kind, ("", ""))[1] == "fixed" else "skipped"
            report.add(Finding(kind, None, None, ann_id, f"{done} by the json loader"), None)
    report.seconds = time.perf_counter() - t0
    return report


def summary_counts(report: DataReport) -> str:
    """``missing_file 1, size_mismatch 2`` for the unusable records."""
    c = Counter(f.kind for f in report.findings if ACTIONS[f.kind][0] == "record"
                and ACTIONS[f.kind][1] != "fixed")
    return ", ".join(f"{k} {n}" for k, n in sorted(c.items()))


def apply_report(records: list[dict], report: DataReport, *, skip: bool,
                 log: logging.Logger | None = None) -> list[dict]:
    """The usable records of ``report``, or :class:`DataCheckError` (the table) when some are
    unusable and ``skip`` is False. Logs the table when there is anything to say."""
    log = log or logger
    if not report.findings:
        log.info("check_data %s: %d records of %s, all usable (%.1f s)", report.mode,
                 report.num_records, report.name or "the dataset", report.seconds)
        return records
    table = report.table()
    if report.unusable and not skip:
        raise DataCheckError(
            f"{table}\n{len(report.unusable)} unusable record(s) in {report.name or 'the data'}."
            " Fix or remove them (tools/check_data.py --json names them all), or set "
            "DATALOADER.SKIP_MISSING_IMAGES True to leave them out.")
    log.warning("%s", table)
    kept = report.apply(records)
    if report.unusable:
        log.warning("check_data: left out %d of %d records of %s (%s)", len(report.unusable),
                    report.num_records, report.name or "the dataset", summary_counts(report))
    return kept
