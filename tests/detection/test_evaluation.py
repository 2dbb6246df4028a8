import contextlib
import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation.coco_evaluation import (
    STAT_NAMES,
    COCOEvaluator,
    detections_to_coco_results,
    write_coco_submission,
)

CATS = [
    {"id": 3, "name": "a"},
    {"id": 7, "name": "b"},
    {"id": 42, "name": "c"},
    {"id": 50, "name": "none"},
]
CONTIG = [3, 7, 42, 50]
# faster-coco-eval must give pycocotools' numbers, since "auto" picks it when installed
ENGINES = ["pycocotools", "faster_coco_eval"]


@pytest.fixture
def gt(tmp_path):
    """10 images of 100x120 (one empty), ~3 boxes each, one crowd region; category 50 has no GT."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 11):
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 120})
        if i == 10:
            continue
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(8, 60), rng.uniform(8, 60)
            x, y = rng.uniform(0, 120 - w), rng.uniform(0, 100 - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(rng.choice([3, 7, 42])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    anns.append(
        {
            "id": len(anns) + 1,
            "image_id": 2,
            "category_id": 7,
            "bbox": [0, 0, 50, 40],
            "area": 2000.0,
            "iscrowd": 1,
            "segmentation": {"size": [100, 120], "counts": [0] + [40, 60] * 49 + [40, 60 + 7000]},
        }
    )
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path, images, anns


def _outputs(images, anns, rng, *, perfect=False):
    inputs, outputs = [], []
    for img in images:
        boxes, scores, labels = [], [], []
        for a in anns:
            if a["image_id"] != img["id"] or a["iscrowd"]:
                continue
            x, y, w, h = a["bbox"]
            if not perfect:
                if rng.random() < 0.15:  # missed
                    continue
                x, y = x + rng.normal(0, 3), y + rng.normal(0, 3)
                w, h = w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)
            boxes.append([x, y, x + w, y + h])
            scores.append(rng.uniform(0.05, 1.0) if not perfect else 1.0)
            labels.append(CONTIG.index(a["category_id"]))
        if not perfect:
            for _ in range(int(rng.integers(0, 3))):  # false positives
                x, y = rng.uniform(0, 90, 2)
                boxes.append([x, y, x + rng.uniform(5, 30), y + rng.uniform(5, 30)])
                scores.append(rng.uniform(0.05, 0.9))
                labels.append(int(rng.integers(0, 4)))
            if img["id"] == 2:  # detections on the crowd region are ignored, not false positives
                boxes.append([2, 2, 20, 15])
                scores.append(0.7)
                labels.append(1)
        inputs.append({"image_id": img["id"], "height": 100, "width": 120})
        outputs.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
    return inputs, outputs


@pytest.mark.parametrize("engine", ENGINES)
def test_equals_pycocotools(gt, tmp_path, engine):
    path, images, anns = gt
    inputs, outputs = _outputs(images, anns, np.random.default_rng(1))
    ev = COCOEvaluator((path, None), output_dir=tmp_path / "out", engine=engine)
    assert ev.engine == engine
    for k in range(0, len(inputs), 3):
        ev.process(inputs[k : k + 3], outputs[k : k + 3])
    res = ev.evaluate()["bbox"]

    results_json = tmp_path / "out" / "coco_instances_results.json"
    dets = json.loads(results_json.read_text())
    assert {d["category_id"] for d in dets} <= {3, 7, 42, 50}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        ref = COCOeval(coco_gt, coco_gt.loadRes(str(results_json)), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    assert 0 < ref.stats[0] < 1
    for name, s in zip(STAT_NAMES, ref.stats):
        if s < 0:
            assert math.isnan(res[name])
        else:
            assert res[name] == pytest.approx(s * 100, abs=1e-9), name
    assert math.isnan(res["AP-none"])  # no ground truth for category 50
    # per-category AP from the engine's precision array equals pycocotools' too
    precision = ref.eval["precision"]
    for k, name in enumerate("abc"):
        p = precision[:, :, k, 0, -1]
        assert res[f"AP-{name}"] == pytest.approx(p[p > -1].mean() * 100, abs=1e-9)
    assert all(0 <= res[f"AP-{c}"] <= 100 for c in "abc")


@pytest.mark.parametrize("engine", ENGINES)
def test_perfect_detections_give_100(gt, engine):
    path, images, anns = gt
    inputs, outputs = _outputs(images, anns, np.random.default_rng(0), perfect=True)
    ev = COCOEvaluator((str(path), None), engine=engine)
    ev.process(inputs, outputs)
    res = ev.evaluate()["bbox"]
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP50"] == pytest.approx(100.0)
    ev.reset()
    ev.process(
        inputs,
        [
            dict(o, boxes=o["boxes"][:0], scores=o["scores"][:0], labels=o["labels"][:0])
            for o in outputs
        ],
    )
    assert ev.evaluate()["bbox"]["AP"] == 0.0  # no detections at all


@pytest.mark.parametrize("engine", ENGINES)
def test_segm_from_masks(tmp_path, engine):
    m = np.zeros((40, 50), np.uint8)
    m[5:25, 10:30] = 1
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    gt = {
        "images": [{"id": 5, "file_name": "x", "height": 40, "width": 50}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 9,
                "bbox": [10, 5, 20, 20],
                "area": 400,
                "iscrowd": 0,
                "segmentation": rle,
            }
        ],
        "categories": [{"id": 9, "name": "sq"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = COCOEvaluator((path, {"contiguous_id_to_dataset_id": [9]}), tasks=("bbox", "segm"),
                       engine=engine)
    ev.process(
        [{"image_id": 5}],
        [
            {
                "boxes": torch.tensor([[10.0, 5, 30, 25]]),
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([0]),
                "masks": torch.from_numpy(m[None].astype(bool)),
            }
        ],
    )
    res = ev.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)


def test_submission_file(tmp_path):
    results = detections_to_coco_results(
        1,
        {"boxes": np.array([[1.0, 2, 11, 22]]), "scores": np.array([0.5]), "labels": np.array([1])},
        [3, 7],
    )
    assert results == [
        {"image_id": 1, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}
    ]
    z = write_coco_submission(results, tmp_path, split="test-dev2017", alg="mymodel")
    assert z.name == "detections_test-dev2017_mymodel_results.zip"
    with zipfile.ZipFile(z) as f:
        assert f.namelist() == ["detections_test-dev2017_mymodel_results.json"]
        assert json.loads(f.read(f.namelist()[0])) == results
    with pytest.raises(ValueError):
        write_coco_submission(results, tmp_path, alg="my_model")


def _dist_worker(rank, world, init_file, gt_path, inputs, outputs, out_file):
    import torch.distributed as dist

    from detection.data.samplers import InferenceSampler

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ev = COCOEvaluator((gt_path, None))
        for i in InferenceSampler(len(inputs)):
            ev.process([inputs[i]], [outputs[i]])
        ev.process([inputs[0]], [outputs[0]])  # a repeated image: deduplicated
        res = ev.evaluate()
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(res["bbox"]["AP"], f)
        else:
            assert res == {}
    finally:
        dist.destroy_process_group()


@pytest.mark.starts_processes
def test_distributed_gather_equals_single_process(gt, tmp_path):
    path, images, anns = gt
    inputs, outputs = _outputs(images, anns, np.random.default_rng(2))
    single = COCOEvaluator((path, None))
    single.process(inputs, outputs)
    expected = single.evaluate()["bbox"]["AP"]
    out_file = tmp_path / "ap.json"
    torch.multiprocessing.spawn(
        _dist_worker,
        args=(2, str(tmp_path / "init"), str(path), inputs, outputs, str(out_file)),
        nprocs=2,
    )
    assert json.loads(out_file.read_text()) == pytest.approx(expected)


def test_labels_map_back_through_the_models_classes(tmp_path):
    """Evaluation, ``predict`` and submission map labels to dataset ids through one function
    and the model's (checkpoint's) metadata; a model whose classes disagree with the ground
    truth's categories is refused, naming each differing label."""
    from detection.evaluation.coco_evaluation import COCOEvaluator
    from detection.modeling.metadata import Metadata, to_dataset_ids

    path = tmp_path / "gt.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 50, "width": 60}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20],
                         "area": 400, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}))
    ev = COCOEvaluator((str(path), None), tasks=("bbox",))
    model = Metadata(class_names=["dog", "cat"], category_ids=[7, 3])  # the other order
    ev.use_model_classes(model)
    out = {"boxes": torch.tensor([[10.0, 10, 30, 30]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([0])}
    ev.process([{"image_id": 1}], [out])
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(100.0)  # label 0 -> dog (7)
    assert model.dataset_ids([0, 1]) == to_dataset_ids([0, 1], [7, 3]) == [7, 3]
    with pytest.raises(ValueError, match="label 2 is outside"):
        model.dataset_ids([2])
    wrong = COCOEvaluator((str(path), None), tasks=("bbox",))
    with pytest.raises(ValueError, match=r"label 1: model \(9, 'horse'\) / dataset has no id 9"
                                         r"; label 2: model \(7, 'wolf'\) / dataset "
                                         r"\(7, 'dog'\)"):
        wrong.use_model_classes(Metadata(class_names=["cat", "horse", "wolf"],
                                         category_ids=[3, 9, 7]))
