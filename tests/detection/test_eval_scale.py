"""COCO evaluation at scale: results json files written in one streaming pass (the same text as
``json.dump``), AP equal to pycocotools', and predictions gathered to rank 0 in chunks."""

import contextlib
import io
import json
import math
import os
import socket
import zipfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation.coco_evaluation import (
    STAT_NAMES,
    COCOEvaluator,
    write_coco_submission,
    write_results_json,
)

CATS = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 42, "name": "c"}]
H, W = 64, 80


def _synthetic_results(images: int, per_image: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 500, (images, per_image, 2)).round(3)
    wh = rng.uniform(1, 200, (images, per_image, 2)).round(3)
    scores = rng.uniform(0, 1, (images, per_image)).round(5)
    cats = rng.choice([3, 7, 42], (images, per_image))
    return [{"image_id": i, "category_id": int(cats[i, k]),
             "bbox": [*map(float, xy[i, k]), *map(float, wh[i, k])],
             "score": float(scores[i, k])}
            for i in range(images) for k in range(per_image)]


def test_results_json_is_json_dump_text(tmp_path):
    results = _synthetic_results(2000, 100)  # 200,000 detections
    path = tmp_path / "out" / "results.json"
    assert write_results_json(path, results) == len(results)
    text = path.read_text()
    assert text == json.dumps(results)
    assert json.loads(text) == results
    assert not [p for p in path.parent.iterdir() if p.name != "results.json"]  # no temp file
    for n in (0, 1, 6, 7, 8, 15):  # around the batch boundaries; a generator works too
        write_results_json(path, (r for r in results[:n]), batch=7)
        assert path.read_text() == json.dumps(results[:n])


def test_submission_zip_holds_the_same_text(tmp_path):
    results = _synthetic_results(300, 20, seed=1)
    z = write_coco_submission(results, tmp_path, split="val2017", alg="big")
    with zipfile.ZipFile(z) as f:
        (name,) = f.namelist()
        assert f.read(name).decode() == json.dumps(results)
    assert (tmp_path / name).read_text() == json.dumps(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, z.name])


def _gt(tmp_path, images: int, seed: int = 0):
    """``images`` images of 64x80 with 1-4 boxes each (polygon masks), categories 3, 7, 42."""
    rng = np.random.default_rng(seed)
    imgs, anns = [], []
    for i in range(1, images + 1):
        imgs.append({"id": i, "file_name": f"{i}.jpg", "height": H, "width": W})
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(8, 40), rng.uniform(8, 30)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            anns.append({"id": len(anns) + 1, "image_id": i,
                         "category_id": int(rng.choice([3, 7, 42])), "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": CATS}))
    return path, imgs, anns


def _outputs(imgs, anns, seed: int, masks: bool = False):
    rng = np.random.default_rng(seed)
    by_image: dict = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    inputs, outputs = [], []
    for img in imgs:
        boxes, scores, labels = [], [], []
        for a in by_image.get(img["id"], []):
            if rng.random() < 0.15:
                continue
            x, y, w, h = a["bbox"]
            x, y = x + rng.normal(0, 2), y + rng.normal(0, 2)
            boxes.append([x, y, x + w * rng.uniform(0.85, 1.15), y + h * rng.uniform(0.85, 1.15)])
            scores.append(rng.uniform(0.05, 1))
            labels.append([3, 7, 42].index(a["category_id"]))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 50, 2)
            boxes.append([x, y, x + rng.uniform(5, 25), y + rng.uniform(5, 25)])
            scores.append(rng.uniform(0.05, 0.9))
            labels.append(int(rng.integers(0, 3)))
        out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
               "scores": torch.tensor(scores, dtype=torch.float32),
               "labels": torch.tensor(labels, dtype=torch.int64)}
        if masks:
            m = torch.zeros(len(boxes), H, W, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                m[k, max(int(y0), 0):max(int(y1), 0), max(int(x0), 0):max(int(x1), 0)] = 1
            out["masks"] = m
        inputs.append({"image_id": img["id"], "height": H, "width": W})
        outputs.append(out)
    return inputs, outputs


def _reference(gt_path, results_path, task):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(results_path)), task)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("engine", ["pycocotools", "faster_coco_eval"])
def test_ap_equals_pycocotools(tmp_path, engine):
    path, imgs, anns = _gt(tmp_path, 150)
    inputs, outputs = _outputs(imgs, anns, seed=1, masks=True)
    ev = COCOEvaluator((path, None), tasks=("bbox", "segm"), output_dir=tmp_path / "out",
                       engine=engine)
    for k in range(0, len(inputs), 4):
        ev.process(inputs[k:k + 4], outputs[k:k + 4])
    res = ev.evaluate()
    written = tmp_path / "out" / "coco_instances_results.json"
    for task in ("bbox", "segm"):
        if task == "segm":  # as the evaluator does: without boxes, loadRes takes the masks
            segm = [{k: v for k, v in r.items() if k != "bbox"}
                    for r in json.loads(written.read_text())]
            (tmp_path / "segm.json").write_text(json.dumps(segm))
        ref = _reference(path, written if task == "bbox" else tmp_path / "segm.json", task)
        assert 0 < ref[0] < 1
        for name, s in zip(STAT_NAMES, ref):
            assert (math.isnan(res[task][name]) if s < 0
                    else res[task][name] == pytest.approx(s * 100, abs=1e-9)), (task, name)
    if engine == "faster_coco_eval":  # its ground truth is not the evaluator's dicts
        assert not any("ignore" in a for a in ev.coco_gt.dataset["annotations"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, port, gt_path, shards, out_dir):
    import torch.distributed as dist

    import detection.evaluation.coco_evaluation as ce

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sent, rounds = [], []
    all_gather, gather = dist.all_gather_object, dist.gather_object

    def all_gather_object(out, obj, *a, **k):
        sent.append(obj)
        return all_gather(out, obj, *a, **k)

    def gather_object(obj, *a, **k):
        rounds.append(len(obj))
        return gather(obj, *a, **k)

    dist.all_gather_object, dist.gather_object = all_gather_object, gather_object
    try:
        ce.GATHER_CHUNK = 2  # several rounds, and ranks of unequal length
        ev = COCOEvaluator((gt_path, None), output_dir=os.path.join(out_dir, "dist"))
        inputs, outputs = shards[rank]
        for inp, out in zip(inputs, outputs):
            ev.process([inp], [out])
        res = ev.evaluate()
        assert all(isinstance(o, int) for o in sent), sent  # only counts go to every rank
        assert len(rounds) == 5  # ceil(9 / 2)
        if rank == 0:
            assert rounds == [0] * 5  # rank 0's own predictions are not sent
            with open(os.path.join(out_dir, "ap.json"), "w") as f:
                json.dump(res["bbox"]["AP"], f)
        else:
            assert res == {} and rounds == [2, 2, 2, 0, 0]
    finally:
        dist.destroy_process_group()


@pytest.mark.starts_processes
def test_gather_in_chunks_over_two_processes(tmp_path):
    path, imgs, anns = _gt(tmp_path, 14, seed=3)
    inputs, outputs = _outputs(imgs, anns, seed=4)
    # rank 0: 9 images; rank 1: 5 images and a repeat of one of rank 0's (padding)
    shards = [(inputs[:9], outputs[:9]), (inputs[9:] + [inputs[0]], outputs[9:] + [outputs[0]])]
    single = COCOEvaluator((path, None), output_dir=tmp_path / "single")
    single.process(inputs, outputs)
    expected = single.evaluate()["bbox"]["AP"]
    mp.start_processes(_gather_worker, args=(_free_port(), str(path), shards, str(tmp_path)),
                       nprocs=2, start_method="spawn", join=True)
    assert json.loads((tmp_path / "ap.json").read_text()) == pytest.approx(expected)
    name = "coco_instances_results.json"
    assert (tmp_path / "dist" / name).read_text() == (tmp_path / "single" / name).read_text()
    ref = _reference(path, tmp_path / "dist" / name, "bbox")
    assert expected == pytest.approx(ref[0] * 100, abs=1e-9)
