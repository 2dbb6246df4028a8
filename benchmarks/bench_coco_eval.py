#!/usr/bin/env python
"""COCO bbox evaluation time on 5,000 images' worth of synthetic detections: pycocotools
against faster-coco-eval, same inputs, same process; checks that all 12 stats agree.

    python benchmarks/bench_coco_eval.py                  # 5000 images, 100 dets/image
    python benchmarks/bench_coco_eval.py --images 500     # quicker
"""

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from backbones import machine


def make_data(num_images: int, dets_per_image: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cat_ids = [int(c) for c in sorted(rng.choice(np.arange(1, 91), size=80, replace=False))]
    images, anns, dets = [], [], []
    ann_id = 1
    for img_id in range(1, num_images + 1):
        w, h = int(rng.integers(320, 641)), int(rng.integers(320, 641))
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id}.jpg"})
        n = int(rng.integers(1, 14))
        for _ in range(n):
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = cat_ids[int(rng.integers(80))]
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat,
                         "bbox": [x, y, bw, bh], "area": bw * bh,
                         "iscrowd": int(rng.random() < 0.01)})
            ann_id += 1
            jitter = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
            dets.append({"image_id": img_id, "category_id": cat,
                         "bbox": [float(v) for v in np.array([x, y, bw, bh]) + jitter],
                         "score": float(rng.uniform(0.3, 1.0))})
        for _ in range(dets_per_image - n):
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            dets.append({"image_id": img_id, "category_id": cat_ids[int(rng.integers(80))],
                         "bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)),
                                  float(bw), float(bh)],
                         "score": float(rng.uniform(0.0, 0.6))})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}
    return gt, dets


def run_engine(name: str, gt_path: str, dets: list):
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if name == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
        gt = COCO(gt_path)
        dt = gt.loadRes(dets)
        ev = Eval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return time.perf_counter() - t0, np.array(ev.stats[:12])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    args = parser.parse_args()
    print(machine.describe(), flush=True)  # the machine heads every table
    gt, dets = make_data(args.images, args.dets)
    with tempfile.TemporaryDirectory() as d:
        gt_path = str(Path(d) / "gt.json")
        Path(gt_path).write_text(json.dumps(gt))
        print(f"{args.images} images, {len(gt['annotations'])} objects, "
              f"{len(gt['categories'])} categories, {len(dets)} detections")
        t_ref, s_ref = run_engine("pycocotools", gt_path, dets)
        print(f"pycocotools:      {t_ref:.1f} s")
        try:
            t_fast, s_fast = run_engine("faster_coco_eval", gt_path, dets)
        except ImportError:
            print("faster-coco-eval is not installed")
            return
        print(f"faster-coco-eval: {t_fast:.1f} s  ratio {t_fast / t_ref:.2f}  "
              f"max |stat diff| {np.abs(s_fast - s_ref).max():.2e}")
        print("stats:", np.round(s_ref, 4).tolist())


if __name__ == "__main__":
    main()
