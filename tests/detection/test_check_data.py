"""The data check on a dataset seeded with the bad records real data holds, built on disk."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection.config import get_cfg
from detection.data.build import Batch, build_test_loader, build_train_loader, check_datasets
from detection.data.catalog import get_metadata
from detection.data.check import DataCheckError, apply_report, check_records
from detection.data.coco import load_coco_json
from detection.data.mapper import DatasetMapper, MapDataset

REPO = Path(__file__).resolve().parents[2]
CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
EXIF_ORIENTATION = 0x0112


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _box_ann(ann_id: int, image_id: int, box: list, cat: int = 1, **extra) -> dict:
    x, y, w, h = box
    poly = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box, "iscrowd": 0,
            "area": float(w * h), "segmentation": poly, **extra}


def build_bad_set(root: Path) -> tuple[Path, Path]:
    """A COCO json + image folder with one of each bad kind (and the fine odd formats)."""
    d = root / "images"
    d.mkdir(parents=True)
    images, anns = [], []

    def add(name: str, h: int, w: int, box: list | None = None) -> int:
        iid = len(images) + 1
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        anns.append(_box_ann(100 + iid, iid, box or [4, 4, 20, 16], cat=[1, 2, 5][iid % 3]))
        return iid

    Image.fromarray(_noise(48, 64, 0)).save(d / "good_a.jpg", quality=90)
    a = add("good_a.jpg", 48, 64)
    Image.fromarray(_noise(64, 48, 1)).save(d / "good_b.png")
    b = add("good_b.png", 64, 48)
    Image.fromarray(_noise(40, 56, 2)[:, :, 0]).save(d / "gray.png")
    add("gray.png", 40, 56)
    Image.fromarray(np.dstack([_noise(40, 56, 3), np.full((40, 56), 200, np.uint8)]),
                    "RGBA").save(d / "rgba.png")
    add("rgba.png", 40, 56)
    Image.fromarray(np.arange(40 * 56, dtype=np.uint16).reshape(40, 56) * 29).save(
        d / "gray16.png")
    assert Image.open(d / "gray16.png").mode.startswith("I")
    add("gray16.png", 40, 56)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 40x56 (h x w), shown rotated: 56x40
    for name in ("exif_rot.jpg", "exif_raw_size.jpg"):
        Image.fromarray(_noise(40, 56, 4)).save(d / name, exif=exif.tobytes())
    add("exif_rot.jpg", 56, 40)
    add("exif_raw_size.jpg", 40, 56)  # the json has the size before rotation: a mismatch
    add("missing.jpg", 48, 64)  # never written
    Image.fromarray(_noise(64, 64, 5)).save(d / "trunc.jpg", quality=95)
    data = (d / "trunc.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[: len(data) // 2])
    add("trunc.jpg", 64, 64)
    (d / "text.jpg").write_text("this is not an image\n" * 20)
    add("text.jpg", 48, 64)
    (d / "empty.jpg").write_bytes(b"")
    add("empty.jpg", 48, 64)
    Image.fromarray(_noise(40, 56, 6)).save(d / "wrong_size.png")
    add("wrong_size.png", 50, 70)
    # annotation-level problems, on the good images
    anns += [
        _box_ann(1, a, [10, 10, 0, 8]),  # zero width
        _box_ann(2, a, [10, 10, 8, -5]),  # negative height
        _box_ann(3, a, [80, 10, 8, 8]),  # entirely outside the 64-wide image
        _box_ann(4, a, [5, 5, 8, 8], cat=99),  # unknown category
        _box_ann(5, b, [5, 5, 8, 8], segmentation={"size": [10, 10], "counts": [100]}),
        _box_ann(6, b, [5, 5, 8, 8], segmentation=[[5, 5, 13, 5]]),  # a 2-point polygon
        _box_ann(7, b, [40, 50, 20, 8]),  # partly outside the 48-wide image: clipped
    ]
    path = root / "bad.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path, d


UNUSABLE_FAST = {"missing.jpg": "missing_file", "text.jpg": "not_an_image",
                 "empty.jpg": "empty_file", "wrong_size.png": "size_mismatch",
                 "exif_raw_size.jpg": "size_mismatch"}
UNUSABLE_FULL = {**UNUSABLE_FAST, "trunc.jpg": "undecodable"}
ANN_COUNTS = {"degenerate_box": 2, "outside_image": 1, "unknown_category": 1, "clipped": 1}


@pytest.fixture
def bad_set(tmp_path):
    return build_bad_set(tmp_path)


@pytest.mark.parametrize("mode,executor", [("fast", "thread"), ("full", "thread"),
                                           ("full", "process")])
def test_check_counts_each_kind(bad_set, mode, executor):
    path, image_dir = bad_set
    records, meta = load_coco_json(path, image_dir)
    report = check_records(records, mode=mode, workers=2, progress=False, executor=executor,
                           load_problems=meta["load_problem_ids"])
    unusable = UNUSABLE_FULL if mode == "full" else UNUSABLE_FAST
    expected = dict(ANN_COUNTS)
    for kind in unusable.values():
        expected[kind] = expected.get(kind, 0) + 1
    if mode == "full":
        expected["invalid_segmentation"] = 2
    assert dict(report.counts()) == expected
    got = {Path(records[i]["file_name"]).name: kinds for i, kinds in report.unusable.items()}
    assert got == {k: [v] for k, v in unusable.items()}
    # grayscale, RGBA, 16-bit and EXIF-rotated images are fine
    kept = {Path(r["file_name"]).name for r in report.apply(records)}
    assert {"gray.png", "rgba.png", "gray16.png", "exif_rot.jpg", "good_a.jpg"} <= kept
    assert len(kept) == len(records) - len(unusable)
    ann_ids = {f.ann_id for f in report.findings if f.kind == "invalid_segmentation"}
    assert ann_ids == ({5, 6} if mode == "full" else set())
    exif = [f for f in report.findings if (f.file_name or "").endswith("exif_raw_size.jpg")]
    assert "before EXIF rotation" in exif[0].detail


def test_table_names_kinds_and_files(bad_set):
    path, image_dir = bad_set
    records, meta = load_coco_json(path, image_dir, "bad")
    report = check_records(records, mode="full", progress=False, name="bad",
                           load_problems=meta["load_problem_ids"])
    table = report.table()
    for kind, n in report.counts().items():
        line = next(ln for ln in table.splitlines() if ln.strip().startswith(kind + " "))
        assert f" {n} " in line
    assert "missing.jpg" in table and "trunc.jpg" in table and "ann 4" in table
    assert "6 unusable" in table.splitlines()[0]
    with pytest.raises(DataCheckError) as e:
        apply_report(records, report, skip=False)
    assert "text.jpg" in str(e.value) and "SKIP_MISSING_IMAGES" in str(e.value)
    out = report.to_dict()
    assert {Path(r["file_name"]).name for r in out["records"]} == set(UNUSABLE_FULL)
    json.dumps(out)  # serialisable as it is


def test_check_data_tool(bad_set, tmp_path):
    path, image_dir = bad_set
    report_path = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "tools" / "check_data.py"), "--config",
           "faster_rcnn_r18_fpn_shapes.yaml", "--dataset", f"{path}:{image_dir}", "--full",
           "--json", str(report_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # unusable records: non-zero
    assert "undecodable" in proc.stdout and "wrong_size.png" in proc.stdout
    (rep,) = json.loads(report_path.read_text()).values()
    assert rep["num_unusable"] == len(UNUSABLE_FULL) and rep["mode"] == "full"
    assert rep["counts"]["unknown_category"] == 1
    assert {Path(r["file_name"]).name for r in rep["records"]} == set(UNUSABLE_FULL)


def _cfg(name: str, *opts: str):
    cfg = get_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "DATASETS.TEST", (name,),
                         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
                         "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", "96", *opts])
    return cfg


def test_train_loader_leaves_out_unusable(bad_set, caplog):
    path, image_dir = bad_set
    name = f"{path}:{image_dir}"
    with pytest.raises(DataCheckError, match="missing.jpg"):  # skipping off: the table
        build_train_loader(_cfg(name, "DATALOADER.CHECK_DATA", "fast"))
    caplog.set_level(logging.INFO)
    cfg = _cfg(name, "DATALOADER.CHECK_DATA", "full", "DATALOADER.SKIP_MISSING_IMAGES", "True")
    loader = build_train_loader(cfg)
    assert f"left out 6 of 12 records of {name}" in caplog.text
    assert "undecodable 1" in caplog.text and "size_mismatch 2" in caplog.text
    assert len(loader.dataset) == 12 - 6
    it = iter(loader)
    seen = {Path(d["file_name"]).name for _ in range(8) for d in next(it)}
    assert not seen & set(UNUSABLE_FULL)
    assert loader.dataset.mapper.num_skipped_images == 0  # nothing left for the mapper
    reports = check_datasets(cfg, [name])  # cached: the same report object
    assert reports[name].mode == "full" and len(reports[name].unusable) == 6


@pytest.mark.parametrize("workers", [0, 1])
def test_test_loader_batches_count_unreadable(bad_set, workers):
    path, image_dir = bad_set
    name = f"{path}:{image_dir}"
    records, _ = load_coco_json(path, image_dir)
    cfg = _cfg(name, "DATALOADER.CHECK_DATA", "fast", "DATALOADER.SKIP_MISSING_IMAGES", "True",
               "DATALOADER.NUM_WORKERS", str(workers))
    loader = build_test_loader(cfg, name, batch_size=1)
    assert len(loader.dataset) == len(records) - len(UNUSABLE_FAST)  # trunc.jpg passes fast
    assert sorted(Path(f).name for f in loader.left_out) == sorted(UNUSABLE_FAST)
    batches = list(loader)
    assert all(type(b) is Batch and isinstance(b, list) for b in batches)
    dropped = [b for b in batches if b.num_unreadable]
    assert len(dropped) == 1 and len(dropped[0]) == 0  # an all-unreadable batch: empty
    assert [Path(f).name for f in dropped[0].unreadable] == ["trunc.jpg"]
    assert sum(len(b) for b in batches) == len(records) - len(UNUSABLE_FULL)
    sizes = {Path(d["file_name"]).name: tuple(d["image"].shape) for b in batches for d in b}
    assert sizes["exif_rot.jpg"] == (3, 56, 40) and sizes["gray16.png"] == (3, 40, 56)


def test_batch_is_a_plain_list_otherwise():
    b = Batch([1, 2], ["x.jpg"])
    assert b == [1, 2] and b.num_unreadable == 1 and b.unreadable == ["x.jpg"]
    assert Batch().num_unreadable == 0 and Batch() == []


def test_skipped_images_counted_once(bad_set, caplog):
    path, image_dir = bad_set
    records, _ = load_coco_json(path, image_dir)
    by_name = {Path(r["file_name"]).name: r for r in records}
    mapper = DatasetMapper(True, min_size_train=(64,), max_size_train=96,
                           skip_missing_images=True)
    caplog.set_level(logging.WARNING)
    for name in ("trunc.jpg", "trunc.jpg", "missing.jpg", "trunc.jpg", "missing.jpg"):
        assert mapper(by_name[name], np.random.default_rng(0)) is None
    assert mapper.num_skipped_images == 2
    warnings = [r for r in caplog.records if "Skipping image_id" in r.getMessage()]
    assert len(warnings) == 2 and "2 distinct images skipped" in warnings[-1].getMessage()
    # a dataset of only bad records and one good one: the replacements find the good one
    bad = [by_name[n] for n in ("trunc.jpg", "missing.jpg", "text.jpg")]
    ds = MapDataset([*bad, by_name["good_a.jpg"]], mapper, seed=3)
    for i in range(3):
        assert ds[(i, 0)]["file_name"].endswith("good_a.jpg")
    assert mapper.num_skipped_images == 3


def test_mapper_refuses_a_size_mismatch(bad_set):
    path, image_dir = bad_set
    records, _ = load_coco_json(path, image_dir)
    rec = next(r for r in records if r["file_name"].endswith("wrong_size.png"))
    from detection.data.errors import ImageSizeError

    with pytest.raises(ImageSizeError, match=r"wrong_size.png.*40x56.*50x70"):
        DatasetMapper(False)(rec)
    mapper = DatasetMapper(False, skip_missing_images=True)
    assert mapper(rec) is None and mapper.num_skipped_images == 1


def test_loader_metadata_lists_skipped_annotation_ids(bad_set):
    path, image_dir = bad_set
    name = f"{path}:{image_dir}"
    check_datasets(_cfg(name), [name])
    ids = get_metadata(name)["load_problem_ids"]
    assert ids == {"degenerate_box": [1, 2], "outside_image": [3], "unknown_category": [4],
                   "clipped": [7]}


def _train(bad_set, tmp_path, *opts: str) -> subprocess.CompletedProcess:
    path, image_dir = bad_set
    name = f"{path}:{image_dir}"
    cmd = [sys.executable, str(REPO / "tools" / "train_det.py"), "--config",
           "faster_rcnn_r18_fpn_shapes.yaml", "DATASETS.TRAIN", f"('{name}',)",
           "DATASETS.TEST", f"('{name}',)", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
           "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
           "SOLVER.CHECKPOINT_PERIOD", "100", "INPUT.MIN_SIZE_TRAIN", "(64,)",
           "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
           "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"), *opts]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_training_with_skipping_runs_to_the_end_and_evaluates(bad_set, tmp_path):
    # fast check: trunc.jpg passes it and is skipped by the mapper, in training and evaluation
    proc = _train(bad_set, tmp_path, "DATALOADER.SKIP_MISSING_IMAGES", "True",
                  "DATALOADER.CHECK_DATA", "fast")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert "left out 5 of 12 records" in log and "size_mismatch 2" in log
    assert (tmp_path / "out" / "inference" / "bad" / "coco_instances_results.json").is_file()
    # the evaluation (detection/engine/evaluation.py) counts the 5 records the check left out
    # (loader.left_out) and trunc.jpg, which the mapper could not decode (batch.unreadable)
    assert "6 of 12 images could not be read" in log and "trunc.jpg" in log
    assert "(over 6 of 12 images; 6 unreadable)" in log


@pytest.mark.slow
def test_training_without_skipping_names_the_files(bad_set, tmp_path):
    proc = _train(bad_set, tmp_path, "DATALOADER.CHECK_DATA", "fast")
    assert proc.returncode != 0
    assert "DataCheckError" in proc.stderr and "SKIP_MISSING_IMAGES" in proc.stderr
    for name in ("missing.jpg", "text.jpg", "empty.jpg", "wrong_size.png"):
        assert name in proc.stderr  # the table names them all
    proc = _train(bad_set, tmp_path, "DATALOADER.CHECK_DATA", "off")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert any(n in last for n in UNUSABLE_FULL), last  # the first error names its file
