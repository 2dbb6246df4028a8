"""The data check's report saved on disk: reused by the next start on unchanged data, checked
again when the json, an image folder or a file it found unusable changes, when the saved file is
unreadable, or when forced; the same records either way."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import detection.data.build as build
import detection.data.check as check
from detection.config import get_cfg
from detection.data.build import check_datasets, check_report, checked_records
from detection.data.check import cached_check, check_records

OLD_NS = 1_600_000_000 * 10**9  # a fixed past mtime: a later change cannot fall in its tick
GOOD = ["a.jpg", "b.png", "c.jpg", "d.png"]


def _write_set(root: Path) -> tuple[Path, Path]:
    """A COCO json over 7 real image files: 4 good, one missing, one truncated, one whose size
    differs from the json's; 2 annotations each (polygons), one degenerate box."""
    d = root / "images"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for name in [*GOOD, "missing.jpg", "trunc.jpg", "wrong_size.png"]:
        iid = len(images) + 1
        h, w = 40, 56
        if name != "missing.jpg":
            size = (30, 30) if name == "wrong_size.png" else (h, w)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / name)
        if name == "trunc.jpg":
            data = (d / name).read_bytes()
            (d / name).write_bytes(data[: len(data) // 2])
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        for k in range(2):
            x, y = 4 + 10 * k, 5
            anns.append({"id": 10 * iid + k, "image_id": iid, "category_id": 1 + k,
                         "bbox": [x, y, 12, 10], "iscrowd": 0, "area": 120.0,
                         "segmentation": [[x, y, x + 12, y, x + 12, y + 10, x, y + 10]]})
    anns.append({"id": 999, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 5],
                 "iscrowd": 0})
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "x"}, {"id": 2, "name": "y"}]}))
    os.utime(path, ns=(OLD_NS, OLD_NS))
    os.utime(d, ns=(OLD_NS, OLD_NS))
    return path, d


@pytest.fixture
def data(tmp_path, monkeypatch):
    """The set's dataset name; DETKIT_CACHE in tmp_path; every image inspection counted."""
    monkeypatch.setenv("DETKIT_CACHE", str(tmp_path / "cache"))
    path, d = _write_set(tmp_path / "set")
    calls = []
    inspect = check._inspect_image

    def counted(p, full):
        calls.append(p)
        return inspect(p, full)

    monkeypatch.setattr(check, "_inspect_image", counted)
    return {"name": f"{path}:{d}", "json": path, "images": d, "calls": calls,
            "cache": tmp_path / "cache" / "data_checks"}


def _cfg(name: str, *opts) -> object:
    cfg = get_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "DATALOADER.SKIP_MISSING_IMAGES", "True",
                         *opts])
    return cfg


def _start(data: dict, *opts, mode: str | None = None):
    """What a new process does: load the records, check them (nothing kept in memory)."""
    build._CHECKED.clear()
    data["calls"].clear()
    cfg = _cfg(data["name"], *opts)
    records = build.get_dataset_records(data["name"], filter_empty=False)
    kept = checked_records(cfg, records, [data["name"]], mode=mode)
    report = check_report(cfg, records, [data["name"]], mode=mode)  # the one just used
    return kept, report, len(data["calls"])


def _same(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    da.pop("seconds"), db.pop("seconds")
    assert da == db
    assert (a.unusable, a.fixes, a.dropped, a.findings) == (b.unusable, b.fixes, b.dropped,
                                                            b.findings)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_second_start_reuses_the_saved_report(data, caplog, mode):
    caplog.set_level(logging.INFO)
    kept1, rep1, calls1 = _start(data, mode=mode)
    assert calls1 == 7 and "data check: result saved to" in caplog.text
    assert len(list(data["cache"].glob("*.json"))) == 1
    unusable = {"missing.jpg", "wrong_size.png"} | ({"trunc.jpg"} if mode == "full" else set())
    assert {Path(r["file_name"]).name for r in kept1} == set(GOOD + ["trunc.jpg"]) - unusable
    caplog.clear()
    kept2, rep2, calls2 = _start(data, mode=mode)
    assert calls2 == 0
    assert "data check: cached result from" in caplog.text and "json unchanged" in caplog.text
    assert kept2 == kept1
    _same(rep1, rep2)
    assert rep2.counts()["degenerate_box"] == 1  # the json loader's findings are kept too


def test_other_mode_or_mask_checking_is_checked_again(data):
    _start(data, mode="fast")
    assert _start(data, mode="full")[2] == 7
    assert _start(data, mode="fast")[2] == 0 and _start(data, mode="full")[2] == 0
    records = build.get_dataset_records(data["name"], filter_empty=False)
    sources = [(data["json"], data["images"])]
    calls = data["calls"]
    for mask_on, expected in ((True, 7), (True, 0), (False, 0)):
        calls.clear()
        cached_check(records, sources=sources, mode="full", mask_on=mask_on, progress=False)
        assert len(calls) == expected


def _touch_json(data):
    os.utime(data["json"], ns=(OLD_NS + 10**9, OLD_NS + 10**9))


def _append_to_json(data):
    with open(data["json"], "a") as f:
        f.write("\n")
    os.utime(data["json"], ns=(OLD_NS, OLD_NS))  # same mtime, another size


def _replace_an_image(data):
    d = data["images"]
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(d / "new.png")
    os.replace(d / "new.png", d / "b.png")


def _add_a_file(data):
    (data["images"] / "notes.txt").write_text("x")


@pytest.mark.parametrize("change, why", [
    (_touch_json, "the json changed"), (_append_to_json, "the json changed"),
    (_replace_an_image, "an image folder changed"), (_add_a_file, "an image folder changed")])
def test_a_change_makes_the_next_start_check_again(data, caplog, change, why):
    kept1, rep1, _ = _start(data)
    change(data)
    caplog.set_level(logging.INFO)
    kept2, rep2, calls = _start(data)
    assert calls == 7 and why in caplog.text
    assert kept2 == kept1
    _same(rep1, rep2)
    assert _start(data)[2] == 0  # and its report is saved again


def test_a_fixed_file_is_noticed_even_in_place(data, caplog):
    kept1, _, _ = _start(data, mode="full")
    assert "trunc.jpg" not in {Path(r["file_name"]).name for r in kept1}
    # rewritten in place (the folder's mtime does not change): the check had found it bad
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(data["images"] / "trunc.jpg",
                                                           format="JPEG")
    os.utime(data["images"], ns=(OLD_NS, OLD_NS))
    caplog.set_level(logging.INFO)
    kept2, rep2, calls = _start(data, mode="full")
    assert calls == 7 and "a file it found unusable changed" in caplog.text
    assert "trunc.jpg" in {Path(r["file_name"]).name for r in kept2}


def _saved(data) -> Path:
    (path,) = data["cache"].glob("*.json")
    return path


@pytest.mark.parametrize("tamper", ["garbage", "empty", "bad_kind", "bad_index", "no_report",
                                    "not_a_dict"])
def test_an_unreadable_saved_report_is_ignored(data, caplog, tamper):
    kept1, rep1, _ = _start(data)
    path = _saved(data)
    doc = json.loads(path.read_text())
    if tamper == "garbage":
        path.write_bytes(b"{\"key\": [\x00\xff")
    elif tamper == "empty":
        path.write_text("")
    elif tamper == "bad_kind":
        doc["report"]["findings"][0][0] = "no_such_kind"
        path.write_text(json.dumps(doc))
    elif tamper == "bad_index":
        doc["report"]["unusable"][0][0] = 10**6
        path.write_text(json.dumps(doc))
    elif tamper == "no_report":
        del doc["report"]
        path.write_text(json.dumps(doc))
    else:
        path.write_text("[1, 2]")
    caplog.set_level(logging.INFO)
    kept2, rep2, calls = _start(data)
    assert calls == 7 and "ignoring the unreadable saved result" in caplog.text
    assert kept2 == kept1
    _same(rep1, rep2)
    assert _start(data)[2] == 0  # replaced by a good one


def test_forcing_checks_again(data, caplog):
    _start(data)
    caplog.set_level(logging.INFO)
    kept, rep, calls = _start(data, "DATALOADER.CHECK_DATA_CACHE", "False")
    assert calls == 7 and "saved result not read" in caplog.text
    build._CHECKED.clear()
    data["calls"].clear()
    reports = check_datasets(_cfg(data["name"]), [data["name"]])  # tools/check_data.py
    assert len(data["calls"]) == 7
    _same(reports[data["name"]], rep)
    assert _start(data)[2] == 0


def test_records_without_a_json_are_not_saved(data):
    records = build.get_dataset_records(data["name"], filter_empty=False)
    build._CHECKED.clear()
    checked_records(_cfg(data["name"]), records)  # no dataset name: nothing to key it by
    assert not data["cache"].exists()


def test_an_unwritable_cache_still_checks(data, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DETKIT_CACHE", str(blocker))
    caplog.set_level(logging.INFO)
    kept, rep, calls = _start(data)
    assert calls == 7 and "could not save the result" in caplog.text
    assert len(kept) == 5


def test_cached_check_equals_check_records(data, tmp_path):
    records = build.get_dataset_records(data["name"], filter_empty=False)
    fresh = check_records(records, mode="full", progress=False, name="x")
    sources = [(data["json"], data["images"])]
    for _ in range(2):  # checked and saved, then read back
        got = cached_check(records, sources=sources, cache_dir=tmp_path / "c", mode="full",
                           progress=False, name="x")
        _same(fresh, got)
        assert got.apply(records) == fresh.apply(records)


def test_saving_removes_the_reports_of_datasets_that_are_gone(data, tmp_path, caplog):
    """A saved report whose json no longer exists can never be reused: the next save deletes
    it, and keeps the reports of existing data and files it cannot read."""
    caplog.set_level(logging.INFO)
    other_json, other_images = _write_set(tmp_path / "other")
    other = f"{other_json}:{other_images}"
    _start(data)
    _start({**data, "name": other})
    assert len(list(data["cache"].glob("*.json"))) == 2
    (data["cache"] / "garbage.json").write_text("{not json")
    other_json.unlink()
    caplog.clear()
    _start(data, "DATALOADER.CHECK_DATA", "fast", mode="fast")  # reused: nothing saved
    assert len(list(data["cache"].glob("*.json"))) == 3
    records = build.get_dataset_records(data["name"], filter_empty=False)
    cached_check(records, sources=[(data["json"], data["images"])], reuse=False)
    left = sorted(p.name for p in data["cache"].glob("*.json"))
    assert len(left) == 2 and "garbage.json" in left, left
    assert "removed 1 saved result(s)" in caplog.text
