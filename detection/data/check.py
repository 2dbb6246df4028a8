"""The data check: every record's image and annotations, before training and evaluation.

Two depths (``DATALOADER.CHECK_DATA``): ``fast`` opens each file's header (it exists, is an
image, and its size after EXIF orientation is the record's height/width); ``full`` also decodes
every image as the mapper will and validates every segmentation.

What each kind of problem gets is the ``ACTIONS`` table (kind -> level, action; docs/training.md
lists it): a ``record`` problem (missing, empty, not an image, undecodable, size mismatch) makes
the record unusable, left out with ``DATALOADER.SKIP_MISSING_IMAGES`` or a ``DataCheckError``;
an ``ann`` problem skips or fixes the annotation. Grayscale, palette, RGBA, 16-bit, CMYK and
EXIF-rotated images are converted by :func:`~detection.data.image_io.read_image`, not problems.

:func:`cached_check` saves a report under ``$DETKIT_CACHE/data_checks`` (default
``~/.cache/detkit/data_checks``) and reuses it while the json files, the folders holding the
images and the files found unusable are unchanged (see its doc); saving one deletes the saved
reports of datasets whose json files no longer exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

from detection.atomic_files import atomic_write
from detection.data.annotations import annotation_box_label, validate_segmentation
from detection.data.coco import MIN_BOX_SIZE
from detection.data.errors import DatasetError, InvalidAnnotationError
from detection.data.image_io import ImageReadError, image_size, read_image
from detection.data.report import ACTIONS, DataReport, Finding

__all__ = ["ACTIONS", "DataCheckError", "DataReport", "Finding", "cached_check", "check_cache_dir",
           "check_records"]

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


# A saved report is reused only while everything it was computed from is unchanged; a new
# format number makes every older file stale.
CACHE_FORMAT = 1


def check_cache_dir() -> Path:
    """``$DETKIT_CACHE/data_checks``, else ``~/.cache/detkit/data_checks``."""
    base = os.environ.get("DETKIT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "detkit") / "data_checks"


def _stat(path: str) -> list[int] | None:
    """[size, mtime_ns] of ``path``, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, ValueError):
        return None


def _cache_identity(records: list[dict], sources: Sequence[tuple[str, str]], mode: str,
                    mask_on: bool) -> tuple[dict, dict]:
    """(the key naming the saved file, the state it must still match).

    The key: format, mode, mask checking, each (json, image folder) by real path. The state:
    each json's [size, mtime_ns], the mtime_ns of the image folders and of every folder holding
    a record's file, and the number and a digest of the records' (file, height, width, number of
    annotations)."""
    key = {"format": CACHE_FORMAT, "mode": mode, "mask_on": bool(mask_on),
           "sources": [[os.path.realpath(j), os.path.realpath(d)] for j, d in sources]}
    digest = hashlib.blake2b(digest_size=16)
    folders = {d for _, d in key["sources"]}
    for r in records:
        name, anns = r.get("file_name"), r.get("annotations")
        name = os.fspath(name) if isinstance(name, (str, os.PathLike)) else ""
        folders.add(os.path.dirname(name))
        n = len(anns) if isinstance(anns, list) else -1
        digest.update(f"{name}\t{r.get('height')}\t{r.get('width')}\t{n}\n"
                      .encode("utf-8", "surrogatepass"))
    state = {"jsons": [_stat(j) for j, _ in key["sources"]],
             "folders": {f: _mtime(f) for f in sorted(folders)},
             "records": [len(records), digest.hexdigest()]}
    return key, state


def _cache_path(cache_dir: Path, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    stem = Path(key["sources"][0][0]).stem if key["sources"] else "records"
    return cache_dir / f"{stem}-{key['mode']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"


def _report_to_json(report: DataReport) -> dict[str, Any]:
    return {
        "name": report.name, "mode": report.mode, "num_records": report.num_records,
        "seconds": report.seconds,
        "findings": [[f.kind, f.file_name, f.image_id, f.ann_id, f.detail]
                     for f in report.findings],
        "unusable": [[i, kinds] for i, kinds in sorted(report.unusable.items())],
        "fixes": [[i, h, w] for i, (h, w) in sorted(report.fixes.items())],
        "dropped": [[i, pos] for i, pos in sorted(report.dropped.items())],
    }


def _report_from_json(d: dict[str, Any], num_records: int) -> DataReport:
    """The saved report, every field checked (TypeError, ValueError, KeyError otherwise)."""
    def index(i: Any) -> int:
        if type(i) is not int or not 0 <= i < num_records:
            raise ValueError(f"record index {i!r} of {num_records}")
        return i

    def ints(values: Any) -> list[int]:
        if not isinstance(values, list) or any(type(v) is not int for v in values):
            raise TypeError(f"not a list of integers: {values!r:.80}")
        return values

    if d["num_records"] != num_records:
        raise ValueError(f"{d['num_records']} records saved, {num_records} given")
    report = DataReport(name=str(d["name"]), mode=str(d["mode"]), num_records=num_records,
                        seconds=float(d["seconds"]))
    for kind, file_name, image_id, ann_id, detail in d["findings"]:
        if kind not in ACTIONS or not isinstance(detail, str) \
                or not isinstance(file_name, (str, type(None))):
            raise ValueError(f"not a finding: {kind!r:.40}, {file_name!r:.80}")
        report.findings.append(Finding(kind, file_name, image_id, ann_id, detail))
    for i, kinds in d["unusable"]:
        if not isinstance(kinds, list) or not all(k in ACTIONS for k in kinds):
            raise ValueError(f"unknown problem kinds {kinds!r:.80}")
        report.unusable[index(i)] = kinds
    for i, h, w in d["fixes"]:
        report.fixes[index(i)] = tuple(ints([h, w]))
    for i, positions in d["dropped"]:
        report.dropped[index(i)] = ints(positions)
    return report


def _load_cached(path: Path, key: dict, state: dict, records: list[dict]
                 ) -> tuple[DataReport | None, str]:
    """(the saved report, when it was saved) when it still holds, else (None, why not);
    ValueError when the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None, "none saved"
    try:
        if saved["key"] != key:
            return None, "it was made for other data"
        old = saved["state"]
        if old["jsons"] != state["jsons"]:
            return None, "the json changed"
        changed = [f for f, t in state["folders"].items() if old["folders"].get(f) != t]
        if changed or len(old["folders"]) != len(state["folders"]):
            return None, f"an image folder changed ({(changed or ['one fewer'])[0]})"
        if old["records"] != state["records"]:
            return None, "the records differ"
        for name, st in saved["files"].items():
            if _stat(name) != st:
                return None, f"a file it found unusable changed ({name})"
        return _report_from_json(saved["report"], len(records)), str(saved["saved"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _save(path: Path, key: dict, state: dict, report: DataReport, records: list[dict]) -> None:
    files = {}
    for i in {*report.unusable, *report.fixes}:  # a fix of one of them must redo the check
        name = records[i].get("file_name")
        if isinstance(name, (str, os.PathLike)):
            files[os.fspath(name)] = _stat(os.fspath(name))
    doc = {"key": key, "state": state, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
           "files": files, "report": _report_to_json(report)}
    try:
        atomic_write(path, lambda f: json.dump(doc, f), binary=False)
    except (OSError, TypeError, ValueError) as e:
        logger.warning("data check: could not save the result to %s (%s)", path, e)
        return
    logger.info("data check: result saved to %s", path)
    _prune(path.parent, path)


def _prune(cache_dir: Path, saved: Path) -> None:
    """Delete the saved reports (other than ``saved``) whose json files no longer exist: their
    data is gone (a deleted set, a temporary folder), so they can never be reused, and the
    folder would otherwise only grow. Unreadable files are left alone."""
    removed = 0
    for other in cache_dir.glob("*.json"):
        if other == saved:
            continue
        try:
            with open(other, encoding="utf-8") as f:
                sources = json.load(f)["key"]["sources"]
            if sources and not any(os.path.exists(j) for j, _ in sources):
                other.unlink()
                removed += 1
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable, or removed meanwhile by another process
    if removed:
        logger.info("data check: removed %d saved result(s) of datasets whose json is gone "
                    "from %s", removed, cache_dir)


def cached_check(
    records: list[dict],
    *,
    sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    reuse: bool = True,
    cache_dir: str | os.PathLike | None = None,
    mode: str = "fast",
    mask_on: bool = False,
    **check_kwargs: Any,
) -> DataReport:
    """:func:`check_records`, its report saved in ``cache_dir`` (default
    :func:`check_cache_dir`) and reused by the next call on the same data.

    ``sources`` are the (json file, image folder) pairs the records were loaded from. A saved
    report is reused when its mode and mask checking are the same and each json's real path,
    size and mtime_ns, the mtime_ns of the image folders and of the folders holding the records'
    files, the records' files, sizes and annotation counts, and the size and mtime_ns of every
    file it found unusable are unchanged. A file of a good record rewritten in place changes
    none of these: ``reuse=False`` checks every image again and replaces the saved report. An
    unreadable saved file is ignored (logged). The log says which it was.
    """
    if mode not in ("fast", "full"):
        raise ValueError(f"DATALOADER.CHECK_DATA must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    key, state = _cache_identity(records, [(os.fspath(j), os.fspath(d)) for j, d in sources],
                                 mode, mask_on)
    path = _cache_path(Path(cache_dir) if cache_dir is not None else check_cache_dir(), key)
    name = check_kwargs.get("name", "")
    if reuse:
        try:
            report, why = _load_cached(path, key, state, records)  # why: or when saved
        except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError included)
            logger.warning("data check: ignoring the unreadable saved result %s (%s)", path, e)
            report, why = None, "unreadable"
        if report is not None:
            report.name, report.seconds = name, time.perf_counter() - t0
            logger.info("data check: cached result from %s (json unchanged, image folders "
                        "unchanged; saved %s): %d records, %d unusable", path, why,
                        report.num_records, len(report.unusable))
            return report
        if why != "unreadable":
            logger.info("data check: no cached result used (%s); checking every image of %s",
                        why, name or "the dataset")
    else:
        logger.info("data check: checking every image of %s (saved result not read)",
                    name or "the dataset")
    report = check_records(records, mode=mode, mask_on=mask_on, **check_kwargs)
    _save(path, key, state, report, records)
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
