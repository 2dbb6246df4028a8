"""Records held serialized: every field comes back as it went in, and forked loader workers
reading them do not grow in private memory as workers reading a list of dicts do."""

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from detection.data.serialized import SerializedRecords


def records(n: int, seed: int = 0):
    """Records of every kind of field COCO gives: boxes, polygons, RLE (str and bytes counts),
    crowd flags, keypoints, unicode file names, images without annotations."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        anns = []
        for j in range(int(g.integers(0, 6))):
            kind = j % 3
            seg = ([g.uniform(0, 100, 12).round(2).tolist() for _ in range(2)] if kind == 0
                   else {"size": [64, 80], "counts": "a1b2c3" * 5} if kind == 1
                   else {"size": [64, 80], "counts": bytes(range(30))})
            anns.append({"bbox": g.uniform(0, 60, 4).round(2).tolist(), "bbox_mode": "XYXY",
                         "category_id": int(g.integers(0, 80)), "iscrowd": int(kind == 1),
                         "segmentation": seg, "id": i * 10 + j,
                         "keypoints": g.uniform(0, 60, 51).round(1).tolist()})
        out.append({"file_name": f"/data/imgs/{i:06d}_é.jpg", "image_id": i, "height": 480,
                    "width": 640 + i % 3, "annotations": anns})
    return out


def test_records_come_back_as_they_went_in():
    want = records(300)
    got = SerializedRecords(want)
    assert len(got) == 300
    for i in (0, 1, 150, 299, -1):
        assert got[i] == want[i]
    assert got[10:13] == want[10:13]
    assert [got[i] for i in range(300)] == want
    assert got[5] is not got[5]  # a fresh copy each time: the buffer cannot be edited
    with pytest.raises(IndexError):
        got[300]
    assert got.nbytes > 0


def test_numbers_come_back_exactly_whatever_their_form():
    """Numbers that hundredths cannot hold (sums, many decimals, huge, NaN-free), ints, mixed
    lists, empty polygons and relative file names all come back equal, type for type."""
    odd = [
        {"file_name": "rel/a.jpg", "image_id": 1, "annotations": [
            {"bbox": [0.1 + 0.2, 1 / 3, 5.25, 1e12], "segmentation": [[1.5, 2.25, 3.125]],
             "keypoints": [1, 2, 2, 3.5, 4.0, 1]},
            {"bbox": [1, 2, 3, 4], "segmentation": [[0.5, 1.0], []], "id": "x"},
            {"bbox": [2.5, 3.5, 10.0, 20.0], "segmentation": [[-1.25, 7.0, 3.0, 4.0]]},
            "not a dict",
        ]},
        {"file_name": "/abs/b.jpg", "image_id": 2, "annotations": []},
        {"file_name": None, "image_id": 3},
    ]
    got = SerializedRecords(odd)
    assert [got[i] for i in range(3)] == odd
    for a, b in zip(got[0]["annotations"], odd[0]["annotations"]):
        if isinstance(a, dict):
            for field in ("bbox", "keypoints"):
                if field in b:
                    assert [type(v) for v in a[field]] == [type(v) for v in b[field]]
    with pytest.raises(ValueError, match="reserved key"):
        SerializedRecords([{"\0numbers": 1}])


def test_released_records_are_dropped_from_the_list_as_they_are_packed():
    """release=True empties the caller's list (the dicts can be freed while the buffer grows)
    and the records still come back equal; it needs a list."""
    want = records(5000, seed=1)  # over two chunks
    given = [dict(r) for r in want]
    got = SerializedRecords(given, release=True)
    assert given == [None] * 5000
    assert [got[i] for i in range(0, 5000, 7)] == want[::7]
    assert got[4999] == want[4999]
    with pytest.raises(TypeError, match="as a list"):
        SerializedRecords(iter(want), release=True)
    assert len(SerializedRecords([], release=True)) == 0


def test_coco_numbers_are_held_compactly():
    """Boxes and two-decimal polygons: the buffer holds each polygon number in 4 bytes and
    one shared folder, well under half of the records pickled one by one."""
    want = records(400, seed=3)
    got = SerializedRecords(want)
    assert [got[i] for i in range(400)] == want
    plain = sum(len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)) for r in want)
    assert got.nbytes < 0.6 * plain, (got.nbytes, plain)
    assert got[7]["file_name"] == want[7]["file_name"]


class Reader(torch.utils.data.Dataset):
    """Touches the whole record, as a mapper does."""

    def __init__(self, recs):
        self.recs = recs

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        r = self.recs[i]
        total = 0.0
        for a in r["annotations"]:
            total += sum(a["keypoints"]) + sum(a["bbox"])
            if isinstance(a["segmentation"], list):
                total += sum(sum(p) for p in a["segmentation"])
        return total


def uss_kib(pid: int) -> int:
    """Private memory (USS) of a process, from /proc/PID/smaps_rollup."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def worker_growth_mib(recs) -> float:
    """Largest growth of a worker's USS over a pass of two workers through ``recs``."""
    loader = torch.utils.data.DataLoader(Reader(recs), batch_size=8, num_workers=2,
                                         persistent_workers=True,
                                         multiprocessing_context="fork")
    it = iter(loader)
    next(it)
    pids = [w.pid for w in it._workers]
    start = [uss_kib(p) for p in pids]
    for _ in it:
        pass
    growth = max(uss_kib(p) - s for p, s in zip(pids, start)) / 1024
    del it, loader
    return growth


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists(
    f"/proc/{os.getpid()}/smaps_rollup"), reason="needs Linux's /proc/PID/smaps_rollup")
@pytest.mark.starts_processes
def test_workers_do_not_copy_serialized_records():
    """6,000 records (tens of MB of Python objects) read once by two forked workers: each
    worker's private memory grows by less than 8 MiB over the pass with the records serialized;
    with the same records as a list of dicts it grows by more (the test's own check)."""
    recs = records(6000, seed=1)
    as_list = worker_growth_mib(recs)
    serialized = worker_growth_mib(SerializedRecords(recs))
    assert serialized < 8, (serialized, as_list)
    assert as_list > 8 and as_list > 2 * serialized, (serialized, as_list)
