#!/usr/bin/env python
"""Time the data check (fast and full) on synthetic records.

    python benchmarks/bench_check_data.py                    # 5,000 records, 96x128 JPEGs
    python benchmarks/bench_check_data.py --records 20000 --size 480 640

Writes the images once into a temporary folder (half JPEG, half PNG; 3 annotations each with a
polygon and, on every tenth record, an RLE; 1% missing, 1% truncated), then times
``check_records`` in fast and full mode with 1 worker thread and with one per core (threads,
and processes). The page cache is warm: the figures are CPU time, not disk time. "CPU s" is
the CPU time of this process over all its threads (worker processes not included): on an idle
machine, threads pay off when it exceeds the wall time.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from backbones import machine
from detection.data.check import check_records


def make_records(root: Path, n: int, h: int, w: int) -> list[dict]:
    """``n`` records over small image files written to ``root`` (see module doc)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    jpg, png = root / "base.jpg", root / "base.png"
    Image.fromarray(base).save(jpg, quality=90)
    Image.fromarray(base).save(png)
    data = {".jpg": jpg.read_bytes(), ".png": png.read_bytes()}
    m = np.zeros((h, w), np.uint8, order="F")
    m[h // 4: h // 2, w // 4: w // 2] = 1
    rle = mask_util.encode(m)
    rle = {"size": rle["size"], "counts": rle["counts"].decode()}
    records = []
    for i in range(n):
        ext = ".jpg" if i % 2 else ".png"
        path = root / f"{i:06d}{ext}"
        if i % 100 == 3:
            pass  # missing
        elif i % 100 == 7:
            path.write_bytes(data[ext][: len(data[ext]) // 2])  # truncated
        else:
            path.write_bytes(data[ext])
        anns = []
        for k in range(3):
            x0, y0 = 4 + 8 * k, 4 + 6 * k
            poly = [x0, y0, x0 + 20, y0, x0 + 20, y0 + 16, x0, y0 + 16]
            anns.append({"id": 3 * i + k, "bbox": [x0, y0, x0 + 20, y0 + 16], "category_id": k,
                         "iscrowd": 0, "segmentation": rle if k == 0 and i % 10 == 0
                         else [poly]})
        records.append({"file_name": str(path), "height": h, "width": w, "image_id": i,
                        "annotations": anns})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    args = parser.parse_args()
    print(machine.describe(), flush=True)  # the machine heads every table
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        records = make_records(Path(tmp), args.records, *args.size)
        print(f"{args.records} records, {args.size[0]}x{args.size[1]} images, {cores} cores")
        check_records(records[:200], mode="full", progress=False)  # warm the page cache
        print("| mode | executor | workers | seconds | CPU s (this process) | records/s | "
              "unusable |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("fast", "full"):
            for executor, workers in (("thread", 1), ("thread", cores), ("process", cores)):
                t0, c0 = time.perf_counter(), time.process_time()
                rep = check_records(records, mode=mode, workers=workers, executor=executor,
                                    progress=False)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                print(f"| {mode} | {executor} | {workers} | {dt:.2f} | {cpu:.2f} | "
                      f"{len(records) / dt:.0f} | {len(rep.unusable)} |", flush=True)


if __name__ == "__main__":
    main()
