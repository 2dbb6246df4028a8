"""Result tables: one log line per task and the markdown table the tools print (0-100)."""

from typing import Dict

__all__ = ["format_ap_line", "format_ap_table"]

_AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_SEM_SEG_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")
_PQ_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")  # panoptic


def _coverage(metrics: Dict[str, float]) -> str:
    """``"over 18 of 20 images; 2 unreadable"`` when the evaluation left images out."""
    bad = int(metrics.get("images_unreadable", 0))
    if not bad:
        return ""
    read = int(metrics.get("images_read", 0))
    return f"over {read} of {read + bad} images; {bad} unreadable"


def format_ap_line(metrics: Dict[str, float]) -> str:
    """``"AP 40.12  AP50 60.00 ..."`` (and the images it covers when some were unreadable)."""
    keys = [k for k in (*_AP_KEYS, *_SEM_SEG_KEYS, *_PQ_KEYS) if k in metrics]
    line = "  ".join(f"{k} {metrics[k]:.2f}" for k in keys)
    coverage = _coverage(metrics)
    return f"{line}  ({coverage})" if coverage else line


def format_ap_table(results: Dict[str, Dict[str, float]]) -> str:
    """A markdown table: one row per task, the six COCO AP numbers (0-100); a second table of
    mIoU and accuracies for semantic segmentation; then a line saying which images the
    numbers cover when some could not be read."""
    lines = ["| task | " + " | ".join(_AP_KEYS) + " |", "|---" * (len(_AP_KEYS) + 1) + "|"]
    for task, m in results.items():
        if isinstance(m, dict) and "AP" in m:
            lines.append(f"| {task} | " + " | ".join(f"{m.get(k, float('nan')):.2f}"
                                                    for k in _AP_KEYS) + " |")
    sem = {t: m for t, m in results.items() if isinstance(m, dict) and "mIoU" in m}
    if sem:  # semantic segmentation: mIoU and accuracies (0-100)
        lines = [] if len(lines) == 2 else [*lines, ""]
        lines += ["| task | " + " | ".join(_SEM_SEG_KEYS) + " |",
                  "|---" * (len(_SEM_SEG_KEYS) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(f"{m.get(k, float('nan')):.2f}"
                                           for k in _SEM_SEG_KEYS) + " |" for t, m in sem.items()]
    pq = {t: m for t, m in results.items() if isinstance(m, dict) and "PQ" in m}
    if pq:  # panoptic segmentation: PQ, SQ, RQ, all / things / stuff (0-100)
        lines = [] if len(lines) == 2 else [*lines, ""]
        lines += ["| task | " + " | ".join(_PQ_KEYS) + " |", "|---" * (len(_PQ_KEYS) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(f"{m.get(k, float('nan')):.2f}"
                                           for k in _PQ_KEYS) + " |" for t, m in pq.items()]
    coverage = next((_coverage(m) for m in results.values() if isinstance(m, dict)
                     and _coverage(m)), "")
    if coverage:
        what = "AP" if any(isinstance(m, dict) and "AP" in m for m in results.values()) \
            else "mIoU"
        lines += ["", f"{what} {coverage}"]
    return "\n".join(lines)
