"""Dataset records held as one byte buffer, so that forked loader workers do not copy them.

A list of record dicts is millions of Python objects (COCO 2017's training set: about 3 M, 1.2
GiB). A forked DataLoader worker shares their pages with the main process until it touches
them, and reading a record touches it (reference counts; the garbage collector walks every
container), so each worker's private memory grows with the records it has read until it holds
a copy of them all. ``SerializedRecords`` pickles each record into one numpy byte buffer with
an offset array (detectron2's answer to the same problem): two objects, which a worker only
reads, and a record is unpickled afresh on each access.

To keep the buffer small, the annotations' lists of floats (``bbox``, ``keypoints``, polygon
``segmentation``) are taken out of the pickled dicts into two arrays: int32 hundredths for the
records whose numbers all round-trip exactly that way (COCO writes two decimals), float64 for
the others; and the file names' common folder is stored once. Decoding gives back equal
records, float for float.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
from collections.abc import Sequence
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = ["SerializedRecords", "gc_paused"]

_LAYOUT = "\0numbers"  # the key under which a pickled record carries its numbers' layout
_INT32_MAX = 2**31 - 1
_CHUNK = 2048  # records whose numbers are encoded together (bounds the extra memory)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (and back on after, if it was on).
    Building millions of containers beside millions of live ones (a COCO-sized json, its
    records) otherwise triggers full collections that walk them all again and again: a
    third of the time of loading and serializing such records."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _floats(value: Any) -> bool:
    return type(value) is list and len(value) > 0 and set(map(type, value)) == {float}


def _take_numbers(record: dict, boxes: list, numbers: list, strict: bool) -> dict:
    """A copy of ``record`` whose annotations' float lists moved to the end of ``boxes``
    (``bbox``) and ``numbers`` (``keypoints``, polygons), with their layout under ``_LAYOUT``:
    one list of ints, per annotation a flag (1 bbox, 2 keypoints, 4 segmentation) followed by
    the lengths of what it took (a polygon segmentation: its count, then each polygon's).
    Not ``strict``, every non-empty list is taken: the caller checks they held only floats."""
    if _LAYOUT in record:
        raise ValueError(f"a record may not hold the reserved key {_LAYOUT!r}")
    anns = record.get("annotations")
    if type(anns) is not list:
        return record
    layout, out_anns, taken = [], [], False
    for ann in anns:
        if type(ann) is not dict:
            layout.append(0)
            out_anns.append(ann)
            continue
        box, points, seg = ann.get("bbox"), ann.get("keypoints"), ann.get("segmentation")
        at = len(layout)
        layout.append(0)
        flag = 0
        if (_floats(box) if strict else type(box) is list and box):
            flag = 1
            layout.append(len(box))
            boxes.extend(box)
        if (_floats(points) if strict else type(points) is list and points):
            flag |= 2
            layout.append(len(points))
            numbers.extend(points)
        if type(seg) is list and seg and (all(map(_floats, seg)) if strict else
                                          set(map(type, seg)) == {list} and all(seg)):
            flag |= 4
            layout.append(len(seg))
            for polygon in seg:
                layout.append(len(polygon))
                numbers.extend(polygon)
        if flag:
            taken = True
            layout[at] = flag
            ann = ann.copy()
            if flag & 1:
                del ann["bbox"]
            if flag & 2:
                del ann["keypoints"]
            if flag & 4:
                del ann["segmentation"]
        out_anns.append(ann)
    if not taken:
        return record
    out = dict(record, annotations=out_anns)
    out[_LAYOUT] = layout
    return out


def _put_numbers(record: dict, boxes: list, values: list) -> dict:
    """The inverse of ``_take_numbers``: ``boxes`` and ``values`` are the record's numbers."""
    layout = record.pop(_LAYOUT)
    i = b = li = 0
    for ann in record["annotations"]:
        flag = layout[li]
        li += 1
        if flag & 1:
            n = layout[li]
            ann["bbox"] = boxes[b:b + n]
            b, li = b + n, li + 1
        if flag & 2:
            n = layout[li]
            ann["keypoints"] = values[i:i + n]
            i, li = i + n, li + 1
        if flag & 4:
            polygons = []
            for n in layout[li + 1:li + 1 + layout[li]]:
                polygons.append(values[i:i + n])
                i += n
            li += 1 + len(polygons)
            ann["segmentation"] = polygons
    return record


class _Numbers:
    """Per record a run of floats, held as int32 hundredths where every value of the run
    round-trips exactly that way (COCO writes two decimals), else as float64."""

    def __init__(self) -> None:
        self._parts: list = []

    def add(self, values: list, ends: list) -> None:
        """The runs of a chunk of records: ``values[ends[i-1]:ends[i]]`` is record i's."""
        a = np.array(values, dtype=np.float64)
        c = np.rint(a * 100.0)
        bad = np.concatenate([[0], np.cumsum(~((np.abs(c) <= _INT32_MAX) & (c / 100 == a)))])
        ends = np.asarray(ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        exact = bad[ends] == bad[starts]
        of_exact = np.repeat(exact, ends - starts)
        self._parts.append((c[of_exact].astype(np.int32), a[~of_exact], ends - starts, exact))

    def close(self) -> None:
        def cat(k, dtype):
            return (np.concatenate([p[k] for p in self._parts]) if self._parts
                    else np.zeros(0, dtype))
        self._centi, self._wide = cat(0, np.int32), cat(1, np.float64)
        count, self._exact = cat(2, np.int64), cat(3, bool)
        self._count = count.astype(np.int32)
        # where each record's run ends in its array (centi if exact, else wide)
        self._ends = np.where(self._exact, np.cumsum(count * self._exact),
                              np.cumsum(count * ~self._exact)).astype(np.int64)
        del self._parts

    def __getitem__(self, index: int) -> list:
        end = int(self._ends[index])
        begin = end - int(self._count[index])
        if self._exact[index]:
            return (self._centi[begin:end] / 100.0).tolist()
        return self._wide[begin:end].tolist()

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self._centi, self._wide, self._count, self._exact,
                                          self._ends)))


def _common_folder(names: list) -> str:
    """The folder (ending in a separator) that every name lies in, or ``""``."""
    if len(names) < 2 or not all(type(n) is str for n in names):
        return ""
    try:
        folder = os.path.commonpath(names)
    except ValueError:  # absolute and relative names mixed
        return ""
    folder = folder.rstrip(os.sep) + os.sep
    return folder if len(folder) > 1 and all(n.startswith(folder) for n in names) else ""


class SerializedRecords(Sequence):
    """An immutable sequence of records (any picklable dicts) stored pickled in one buffer,
    their annotations' numbers in two arrays (see the module doc)."""

    def __init__(self, records: Iterable[dict], *, release: bool = False) -> None:
        """``release``: ``records`` is a list the caller gives up; its entries are set to
        None as they are packed, so that the dicts (when nothing else holds them) are freed
        while the buffer grows instead of both being held at once."""
        if release and not isinstance(records, list):
            raise TypeError("release=True needs the records as a list")
        with gc_paused():
            self._build(records if isinstance(records, list) else list(records), release)

    def _build(self, records: list, release: bool) -> None:
        self._folder = _common_folder([r.get("file_name") for r in records])
        cut = len(self._folder)
        buffer = bytearray()  # grown in place (a copy of the whole, joined, would double it)
        offsets = np.empty(len(records), dtype=np.int64)  # where each record's pickle ends
        self._boxes, self._numbers = _Numbers(), _Numbers()
        for first in range(0, len(records), _CHUNK):
            chunk = records[first:first + _CHUNK]
            for strict in (False, True):
                boxes: list = []
                numbers: list = []
                box_ends, ends, taken = [], [], []
                for r in chunk:
                    taken.append(_take_numbers(r, boxes, numbers, strict))
                    box_ends.append(len(boxes))
                    ends.append(len(numbers))
                if strict or not (set(map(type, boxes)) | set(map(type, numbers))) - {float}:
                    break  # else ints or other values: list by list
            self._boxes.add(boxes, box_ends)
            self._numbers.add(numbers, ends)
            for i, r in enumerate(taken, first):
                if cut:
                    r = dict(r, file_name=r["file_name"][cut:])
                buffer += pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)
                offsets[i] = len(buffer)
            if release:
                records[first:first + len(chunk)] = [None] * len(chunk)
            del chunk, taken
        self._boxes.close()
        self._numbers.close()
        self._ends = offsets
        self._buffer = np.frombuffer(buffer, dtype=np.uint8)
        self._buffer.flags.writeable = False

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._ends)
        if not -n <= index < n:
            raise IndexError(f"record {index} of {n}")
        index %= n
        start = int(self._ends[index - 1]) if index else 0
        record = pickle.loads(self._buffer[start:int(self._ends[index])].tobytes())
        if _LAYOUT in record:
            _put_numbers(record, self._boxes[index], self._numbers[index])
        if self._folder:
            record["file_name"] = self._folder + record["file_name"]
        return record

    @property
    def nbytes(self) -> int:
        """The memory the records take: the buffer, the numbers and the offsets."""
        return int(self._buffer.nbytes + self._ends.nbytes + self._boxes.nbytes
                   + self._numbers.nbytes)
