#!/usr/bin/env python
"""The data pipeline on a COCO-2017-train-sized set: loading, records, check cache, workers.

    python benchmarks/bench_data_scale.py                          # 118,287 images
    python benchmarks/bench_data_scale.py --images 20000 --dir /tmp/coco_syn   # kept, reused

Writes a synthetic set (tiny JPEGs of 32x32, 24x32 and 32x24; ~7.3 boxes per image, half with
a 12-point polygon; COCO's 80 category ids, 1..90 with gaps) unless ``--dir`` already holds
one of that size. Each measure runs in a fresh process: json parse, record building, the
records' serialized size, peak RSS while loading (to the records built, then to the records
serialized, as ``build_train_loader`` does) and RSS after each; time from
``build_train_loader`` to the first batch with no saved data check (cold) and with it (warm;
``DATALOADER.CHECK_DATA fast``, ``$DETKIT_CACHE`` inside the set's folder); USS growth of each
loader worker over ``--batches`` batches. Image files are in the page cache: times are CPU
time, not disk time.
"""

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COCO_TRAIN_IMAGES = 118_287
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
SHAPES = [(32, 32), (24, 32), (32, 24)]  # (height, width)
MIB = 2**20


def make_set(root: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` images and their json under ``root`` (see module doc); returns the json."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images_dir = root / "train2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    blobs = {}  # a few distinct files per shape, written again and again
    for h, w in SHAPES:
        for k in range(8):
            path = root / "blob.jpg"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=80)
            blobs[(h, w, k)] = path.read_bytes()
    path.unlink()
    shape_of = rng.integers(0, len(SHAPES), n)
    counts = np.minimum(rng.poisson(7.3, n), 40)
    images, anns = [], []
    for i in range(n):
        h, w = SHAPES[shape_of[i]]
        name = f"{i + 1:012d}.jpg"
        (images_dir / name).write_bytes(blobs[(h, w, i % 8)])
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        m = int(counts[i])
        boxes = np.concatenate([rng.uniform(0, 0.6, (m, 2)) * (w, h),
                                rng.uniform(2, 0.4 * min(h, w), (m, 2))], axis=1).round(2)
        # a 12-point polygon in each box: [m, 24] as x0, y0, x1, y1, ...
        angles = np.sort(rng.uniform(0, 2 * np.pi, (m, 12)), axis=1)
        half = boxes[:, 2:] / 2
        poly = np.stack([boxes[:, :1] + half[:, :1] * (1 + np.cos(angles)),
                         boxes[:, 1:2] + half[:, 1:] * (1 + np.sin(angles))], axis=2)
        polys = poly.reshape(m, 24).round(2).tolist()
        cats = rng.integers(0, 80, m)
        for k, (x, y, bw, bh) in enumerate(boxes.tolist()):
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": COCO_IDS[cats[k]],
                   "bbox": [x, y, bw, bh], "area": round(bw * bh, 2), "iscrowd": 0}
            if len(anns) % 2 == 0:
                ann["segmentation"] = [polys[k]]
            anns.append(ann)
    (root / "annotations").mkdir(exist_ok=True)
    json_path = root / "annotations" / "instances_train2017.json"
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": c, "name": f"class{c}"} for c in COCO_IDS]}, f)
    (root / "bench_data_scale.json").write_text(json.dumps({"images": n, "seed": seed}))
    return json_path


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> None:
    """Start the peak RSS afresh (Linux: VmHWM is reset by writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then counts from the start of the process


def _peak_rss() -> int:
    """Peak RSS since :func:`_reset_peak_rss` (or the start of the process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def phase_load(root: Path) -> dict:
    from detection.data.coco import load_coco_json, read_coco_json
    from detection.data.serialized import SerializedRecords

    json_path, images_dir = root / "annotations" / "instances_train2017.json", root / "train2017"
    gc.collect()
    rss0 = _rss()
    _reset_peak_rss()
    t0 = time.perf_counter()
    read_coco_json(json_path, keep=True)  # the parse, kept for the records built next
    t1 = time.perf_counter()
    records, _ = load_coco_json(json_path, images_dir)  # consumes the kept json
    t2 = time.perf_counter()
    gc.collect()
    rss_records, peak_records = _rss(), _peak_rss()
    n, anns = len(records), sum(len(r["annotations"]) for r in records)
    t3 = time.perf_counter()
    buffer = SerializedRecords(records, release=True)  # as build_train_loader does
    t4 = time.perf_counter()
    del records
    gc.collect()
    return {"parse_s": t1 - t0, "records_s": t2 - t1, "serialize_s": t4 - t3,
            "records": n, "annotations": anns, "nbytes": buffer.nbytes, "rss0": rss0,
            "peak_records": peak_records, "peak": _peak_rss(), "rss_records": rss_records,
            "rss_serialized": _rss(), "json_bytes": json_path.stat().st_size}


def phase_first_batch(root: Path, workers: int, batches: int) -> dict:
    import logging

    import psutil

    from detection.config import get_cfg
    from detection.data.build import build_train_loader

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    name = f"{root / 'annotations' / 'instances_train2017.json'}:{root / 'train2017'}"
    cfg = get_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "DATALOADER.NUM_WORKERS", str(workers),
                         "DATALOADER.CHECK_DATA", "fast", "SOLVER.IMS_PER_BATCH", "4",
                         "INPUT.MIN_SIZE_TRAIN", (32,), "INPUT.MAX_SIZE_TRAIN", "64"])
    _reset_peak_rss()
    t0 = time.perf_counter()
    loader = build_train_loader(cfg)
    t1 = time.perf_counter()
    it = iter(loader)
    next(it)
    t2 = time.perf_counter()
    peak = _peak_rss()  # of this process, to the first batch (workers not included)
    procs = psutil.Process().children(recursive=True)
    uss0 = [p.memory_full_info().uss for p in procs]
    for _ in range(batches):
        next(it)
    uss1 = [p.memory_full_info().uss for p in procs]
    out = {"loader_s": t1 - t0, "first_batch_s": t2 - t0, "rss": _rss(), "peak": peak,
           "uss0": uss0, "uss_growth": [b - a for a, b in zip(uss0, uss1)]}
    del it, loader
    return out


def _run(phase: str, args: argparse.Namespace, root: Path) -> tuple[dict, str]:
    """Run ``phase`` in a fresh process; (its result, its log)."""
    env = {**os.environ, "DETKIT_CACHE": str(root / "cache")}
    cmd = [sys.executable, __file__, "--phase", phase, "--dir", str(root),
           "--workers", str(args.workers), "--batches", str(args.batches)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--dir", type=Path, help="make (or reuse) the set here and keep it")
    parser.add_argument("--workers", type=int, default=2, help="DATALOADER.NUM_WORKERS")
    parser.add_argument("--batches", type=int, default=200,
                        help="batches (of 4 images) over which worker USS growth is measured")
    parser.add_argument("--phase", choices=["load", "first_batch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = (phase_load(args.dir) if args.phase == "load"
                  else phase_first_batch(args.dir, args.workers, args.batches))
        print("RESULT " + json.dumps(result), flush=True)
        return

    from backbones.machine import describe

    print(describe(), flush=True)  # the machine heads every table
    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="bench_data_scale_")
        root = Path(tmp)
    try:
        marker = root / "bench_data_scale.json"
        made = "reused"
        if not marker.is_file() or json.loads(marker.read_text()).get("images") != args.images:
            t0 = time.perf_counter()
            make_set(root, args.images)
            made = f"written in {time.perf_counter() - t0:.0f} s"
        load, _ = _run("load", args, root)
        shutil.rmtree(root / "cache", ignore_errors=True)
        cold, cold_log = _run("first_batch", args, root)
        warm, warm_log = _run("first_batch", args, root)
        assert "cached result from" not in cold_log and "cached result from" in warm_log
        print(f"{load['records']:,} images, {load['annotations']:,} annotations, json "
              f"{load['json_bytes'] / MIB:.0f} MiB ({made}); {args.workers} loader workers, "
              f"batches of 4; the RSS figures include the interpreter and torch "
              f"({load['rss0'] / MIB:.0f} MiB before loading)")
        rows = [
            ("json parse", f"{load['parse_s']:.1f} s"),
            ("record building", f"{load['records_s']:.1f} s"),
            ("records serialized (SerializedRecords.nbytes)",
             f"{load['nbytes'] / MIB:.0f} MiB in {load['serialize_s']:.1f} s"),
            ("peak RSS while loading: to the records built / to the records serialized",
             f"{load['peak_records'] / MIB:.0f} MiB / {load['peak'] / MIB:.0f} MiB"),
            ("RSS after loading (records as dicts)", f"{load['rss_records'] / MIB:.0f} MiB"),
            ("RSS after, records serialized, dicts freed",
             f"{load['rss_serialized'] / MIB:.0f} MiB"),
            ("first training batch, cold (data check runs)", f"{cold['first_batch_s']:.1f} s"),
            ("first training batch, warm (saved data check)", f"{warm['first_batch_s']:.1f} s"),
            ("  of which build_train_loader, cold / warm",
             f"{cold['loader_s']:.1f} s / {warm['loader_s']:.1f} s"),
            ("peak RSS of the training process to the first batch, cold / warm",
             f"{cold['peak'] / MIB:.0f} MiB / {warm['peak'] / MIB:.0f} MiB"),
            ("worker USS after the first batch",
             ", ".join(f"{u / MIB:.1f}" for u in warm["uss0"]) + " MiB"),
            (f"worker USS growth over {args.batches} batches",
             ", ".join(f"{u / MIB:+.1f}" for u in warm["uss_growth"]) + " MiB"),
        ]
        print("| measure | value |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
