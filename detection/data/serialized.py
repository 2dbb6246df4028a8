"""Dataset records held as one byte buffer, so that forked loader workers do not copy them.

A list of record dicts is millions of Python objects (COCO 2017's training set: about 3 M, 1.2
GiB). A forked DataLoader worker shares their pages with the main process until it touches
them, and reading a record touches it (reference counts; the garbage collector walks every
container), so each worker's private memory grows with the records it has read until it holds
a copy of them all. ``SerializedRecords`` pickles each record into one numpy byte buffer with
an offset array (detectron2's answer to the same problem): two objects, which a worker only
reads, and a record is unpickled afresh on each access.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Iterable

import numpy as np

__all__ = ["SerializedRecords"]


class SerializedRecords(Sequence):
    """An immutable sequence of records (any picklable dicts) stored pickled in one buffer."""

    def __init__(self, records: Iterable[dict]) -> None:
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._ends = np.cumsum(np.fromiter((len(b) for b in blobs), dtype=np.int64,
                                           count=len(blobs)))
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

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
        return pickle.loads(self._buffer[start:int(self._ends[index])].tobytes())

    @property
    def nbytes(self) -> int:
        """The memory the records take: the buffer and the offsets."""
        return int(self._buffer.nbytes + self._ends.nbytes)
