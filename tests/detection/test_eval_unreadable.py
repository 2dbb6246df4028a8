"""Evaluation over a dataset with unreadable images (DATALOADER.SKIP_MISSING_IMAGES): a batch
whose images all failed never reaches the model, the unreadable images are counted once each
per pass, the AP covers the images read and says so, and the COCO results json is written."""

import json
import logging
from pathlib import Path

import pytest
import torch

from detection.config import load_config
from detection.data.build import build_test_loader
from detection.data.mapper import DatasetMapper
from detection.data.shapes import ensure_shapes_dataset
from detection.engine.evaluation import build_evaluator, evaluate, inference_on_dataset
from detection.engine.loading import attach_dataset_metadata, build_model_from_cfg
from detection.engine.result_tables import format_ap_line, format_ap_table


@pytest.fixture(scope="module")
def damaged_val(tmp_path_factory):
    """Six val images of the shapes set: one file deleted, one replaced by text."""
    root = tmp_path_factory.mktemp("damaged")
    p = ensure_shapes_dataset(root=root, num_train=4, num_val=6, image_size=(64, 96))
    images = json.loads(Path(p.val_json).read_text())["images"]
    missing, corrupt = images[1], images[4]
    (Path(p.val_images) / missing["file_name"]).unlink()
    (Path(p.val_images) / corrupt["file_name"]).write_text("not an image")
    good = sorted(im["id"] for im in images if im not in (missing, corrupt))
    return (f"{p.train_json}:{p.train_images}", f"{p.val_json}:{p.val_images}", good,
            [missing["file_name"], corrupt["file_name"]])


def _cfg(damaged_val, out, check="off"):
    train, val, _, _ = damaged_val
    return load_config("faster_rcnn_r18_fpn_shapes.yaml", [
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
        "DATALOADER.SKIP_MISSING_IMAGES", "True", "DATALOADER.CHECK_DATA", check,
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "OUTPUT_DIR", str(out),
    ])


@pytest.fixture(scope="module")
def model_and_cfg(damaged_val, tmp_path_factory):
    cfg = _cfg(damaged_val, tmp_path_factory.mktemp("out"))
    attach_dataset_metadata(cfg)
    torch.manual_seed(0)
    return build_model_from_cfg(cfg).eval(), cfg


class _NoEmptyBatches(torch.nn.Module):
    """The real detector; records the batch sizes it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, images):
        self.sizes.append(len(images))
        return self.model(images)


@pytest.mark.parametrize("check", ["off", "fast"])  # found by the loader, or by the check
def test_evaluation_skips_unreadable_images_and_says_so(damaged_val, model_and_cfg, check,
                                                       tmp_path, caplog):
    model, _ = model_and_cfg
    _, _, good, bad_files = damaged_val
    cfg = _cfg(damaged_val, tmp_path, check)
    attach_dataset_metadata(cfg)
    for _ in range(2):  # counted once each per pass, not accumulated over passes
        results = evaluate(cfg, model)
        assert results["bbox"]["images_read"] == 4
        assert results["bbox"]["images_unreadable"] == 2
    assert "AP over 4 of 6 images; 2 unreadable" in format_ap_table(results)
    assert "(over 4 of 6 images; 2 unreadable)" in format_ap_line(results["bbox"])
    written = json.loads(next(Path(cfg.OUTPUT_DIR).glob(
        "inference/*/coco_instances_results.json")).read_text())
    assert isinstance(written, list) and {d["image_id"] for d in written} <= set(good)
    for name in bad_files:
        assert Path(name).name in caplog.text


@pytest.mark.parametrize("batch_size", [1, 3])
def test_empty_batches_never_reach_the_model_and_ap_covers_the_images_read(
        damaged_val, model_and_cfg, tmp_path, batch_size):
    model, cfg = model_and_cfg
    _, val, good, _ = damaged_val
    loader = build_test_loader(cfg, val, batch_size=batch_size)
    evaluator = build_evaluator(cfg, val, tmp_path)
    wrapped = _NoEmptyBatches(model)
    results = inference_on_dataset(wrapped, loader, evaluator)
    # batch size 1: the two unreadable images leave two empty batches, which are skipped
    assert sum(wrapped.sizes) == 4 and min(wrapped.sizes) > 0
    assert len(wrapped.sizes) == (4 if batch_size == 1 else 2)
    assert sorted(evaluator.coco_eval["bbox"].params.imgIds) == good
    assert results["bbox"]["images_unreadable"] == 2
    assert (tmp_path / "coco_instances_results.json").is_file()


class _Batch(list):
    """A test batch as the loader's collate reports the images it dropped."""

    def __init__(self, items, unreadable):
        super().__init__(items)
        self.unreadable = list(unreadable)
        self.num_unreadable = len(self.unreadable)


def test_batches_that_name_their_unreadable_images(damaged_val, model_and_cfg, tmp_path,
                                                    caplog):
    model, cfg = model_and_cfg
    _, val, good, bad_files = damaged_val
    from detection.data.build import get_dataset_records

    mapper = DatasetMapper.from_config(cfg, is_train=False)
    records = get_dataset_records(val, filter_empty=False)
    batches = []
    for i in range(0, len(records), 2):  # batches of 2; the loader itself, by hand
        mapped = [(r, mapper(r)) for r in records[i:i + 2]]
        batches.append(_Batch([m for _, m in mapped if m is not None],
                              [Path(r["file_name"]).name for r, m in mapped if m is None]))
    evaluator = build_evaluator(cfg, val, tmp_path)
    with caplog.at_level(logging.WARNING):
        results = inference_on_dataset(model, batches, evaluator)
    assert results["bbox"]["images_read"] == 4 and results["bbox"]["images_unreadable"] == 2
    assert sorted(evaluator.coco_eval["bbox"].params.imgIds) == good
    assert "2 of 6 images could not be read" in caplog.text
    for name in bad_files:
        assert Path(name).name in caplog.text


def test_every_image_unreadable_still_writes_the_json(damaged_val, model_and_cfg, tmp_path):
    model, cfg = model_and_cfg
    _, val, _, _ = damaged_val
    evaluator = build_evaluator(cfg, val, tmp_path)
    results = inference_on_dataset(model, [_Batch([], ["a.jpg"]), _Batch([], ["b.jpg"])],
                                   evaluator)
    assert results == {}  # no AP over zero images
    assert json.loads((tmp_path / "coco_instances_results.json").read_text()) == []
