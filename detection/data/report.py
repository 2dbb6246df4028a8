"""The data check's findings: one table for the log, a json naming every unusable record."""

from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ACTIONS", "DataReport", "Finding"]

# kind -> (level, what is done). Level "record": about the image file (unusable unless fixed);
# "annotation": about one annotation. See detection.data.check's module doc.
ACTIONS: dict[str, tuple[str, str]] = {
    "missing_file": ("record", "left out"),
    "empty_file": ("record", "left out"),
    "not_an_image": ("record", "left out"),
    "undecodable": ("record", "left out"),
    "size_mismatch": ("record", "left out"),
    "no_size": ("record", "fixed"),
    "unknown_image": ("annotation", "skipped"),
    "unknown_category": ("annotation", "skipped"),
    "degenerate_box": ("annotation", "skipped"),
    "outside_image": ("annotation", "skipped"),
    "invalid_box": ("annotation", "skipped"),
    "invalid_annotation": ("annotation", "skipped"),
    "clipped": ("annotation", "fixed"),
    "invalid_segmentation": ("annotation", "skipped with MASK_ON"),
}


@dataclass(frozen=True)
class Finding:
    """One problem: its kind, where it is (file, image id, annotation id) and what was seen."""

    kind: str
    file_name: str | None
    image_id: Any
    ann_id: Any
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "file_name": self.file_name, "image_id": self.image_id,
                "ann_id": self.ann_id, "detail": self.detail}


@dataclass
class DataReport:
    """Everything a check found in one dataset (records are referred to by their index)."""

    name: str
    mode: str
    num_records: int
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    unusable: dict[int, list[str]] = field(default_factory=dict)  # index -> kinds
    fixes: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (h, w)
    dropped: dict[int, list[int]] = field(default_factory=dict)  # index -> annotation positions

    def add(self, finding: Finding, index: int | None) -> None:
        """Record ``finding`` of record ``index`` (None: an annotation the loader dropped)."""
        if finding.kind not in ACTIONS:
            raise KeyError(f"unknown data problem kind {finding.kind!r}")
        self.findings.append(finding)
        level, action = ACTIONS[finding.kind]
        if index is not None and level == "record" and action != "fixed":
            self.unusable.setdefault(index, []).append(finding.kind)

    def counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.findings)

    def num_annotations_skipped(self) -> int:
        return sum(n for k, n in self.counts().items()
                   if ACTIONS[k][0] == "annotation" and ACTIONS[k][1] != "fixed")

    def table(self, examples: int = 3) -> str:
        """A text table: each kind of problem, its count, the action, the first examples."""
        counts = self.counts()
        head = (f"check_data ({self.mode}) of {self.name or 'the dataset'}: "
                f"{self.num_records} records in {self.seconds:.1f} s; "
                f"{len(self.unusable)} unusable, "
                f"{self.num_annotations_skipped()} annotation problem(s)")
        rows = [("problem", "count", "action", "first examples")]
        for kind in ACTIONS:
            if not counts[kind]:
                continue
            level, action = ACTIONS[kind]
            first = [f for f in self.findings if f.kind == kind][:examples]
            if level == "record":
                ex = ", ".join(os.path.basename(f.file_name or "?") for f in first)
            else:
                ex = ", ".join(f"ann {f.ann_id}" + (f" ({os.path.basename(f.file_name)})"
                                                    if f.file_name else "") for f in first)
            rows.append((kind, str(counts[kind]), f"{level} {action}", ex))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head]
        for k, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  "
                         + r[3])
            if k == 0:
                lines.append("  " + "-" * (sum(widths) + 6 + len(r[3])))
        if len(rows) == 1:
            lines.append("  (no problems)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The json report: counts, and every unusable record and problem annotation."""
        record_level = [f.to_dict() for f in self.findings if ACTIONS[f.kind][0] == "record"]
        return {
            "dataset": self.name,
            "mode": self.mode,
            "num_records": self.num_records,
            "num_unusable": len(self.unusable),
            "seconds": round(self.seconds, 3),
            "counts": dict(sorted(self.counts().items())),
            "actions": {k: " ".join(ACTIONS[k]) for k in sorted(self.counts())},
            "records": record_level,
            "annotations": [f.to_dict() for f in self.findings
                            if ACTIONS[f.kind][0] == "annotation"],
        }

    def apply(self, records: list[dict]) -> list[dict]:
        """The usable records, with fixes (sizes from the file) and dropped annotations applied
        to copies; the input list and its records are not modified."""
        out = []
        for i, rec in enumerate(records):
            if i in self.unusable:
                continue
            if i in self.fixes or i in self.dropped:
                rec = copy.copy(rec)
                if i in self.fixes:
                    rec["height"], rec["width"] = self.fixes[i]
                if i in self.dropped:  # (a field that is not a list: no annotations)
                    gone, anns = set(self.dropped[i]), rec.get("annotations")
                    rec["annotations"] = [a for p, a in enumerate(anns) if p not in gone] \
                        if isinstance(anns, list) else []
            out.append(rec)
        return out
