"""PQ, SQ and RQ against values worked out by hand, with void, a crowd region, an IoU of
exactly 0.5 (not a match), a prediction half on void (counted), a class absent from one image
and a class absent from both (left out of the means); the evaluator through PNG files and the
model's label conventions; and the bad-id errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.panoptic.evaluation import PanopticEvaluator, pq_from_stats, pq_stats
from segmentation.panoptic.format import PanopticFormatError, id2rgb, rgb2id

# dataset categories: three things (dog appears nowhere) and three stuff classes
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "dog", "isthing": 1}, {"id": 10, "name": "sky", "isthing": 0},
    {"id": 11, "name": "grass", "isthing": 0}, {"id": 12, "name": "road", "isthing": 0},
]
CAT_IDS = [c["id"] for c in CATEGORIES]
ISTHING = [bool(c["isthing"]) for c in CATEGORIES]


def runs(*spans):
    """A (1, N) id map from (id, start, stop) runs of pixels."""
    n = max(stop for _, _, stop in spans)
    out = np.full((1, n), -1, np.int64)
    for i, a, b in spans:
        out[0, a:b] = i
    assert (out >= 0).all()
    return out


# Image 1, 40 pixels.
# GT: person g1 [0,10) 10 px; person g2 [10,16) 6 px; crowd car g3 [16,24) 8 px; void [24,28);
#     sky g4 [28,40) 12 px.
GT1 = runs((1, 0, 10), (2, 10, 16), (3, 16, 24), (0, 24, 28), (4, 28, 40))
GT1_SEGS = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
            {"id": 3, "category_id": 2, "iscrowd": 1}, {"id": 4, "category_id": 10, "iscrowd": 0}]
# Prediction: person p1 [0,8) 8 px; car p3 [8,10) + [16,22) 8 px; person p2 [10,13) + [24,27)
#     6 px; void [13,16); person p4 [22,24) + [27,28) 3 px; sky p5 [28,40) 12 px.
PRED1 = runs((1, 0, 8), (3, 8, 10), (2, 10, 13), (0, 13, 16), (3, 16, 22), (4, 22, 24),
             (2, 24, 27), (4, 27, 28), (5, 28, 40))
PRED1_SEGS = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1},
              {"id": 3, "category_id": 2}, {"id": 4, "category_id": 1},
              {"id": 5, "category_id": 10}]
# Image 2, 30 pixels. GT: car [0,10), grass [10,30). Prediction: car [0,12), road [12,18) (a
# stuff class absent from the ground truth), grass [18,30).
GT2 = runs((7, 0, 10), (9, 10, 30))
GT2_SEGS = [{"id": 7, "category_id": 2, "iscrowd": 0}, {"id": 9, "category_id": 11, "iscrowd": 0}]
PRED2 = runs((1, 0, 12), (2, 12, 18), (3, 18, 30))
PRED2_SEGS = [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 12},
              {"id": 3, "category_id": 11}]

# By hand, image 1:
#   p1/g1 person: intersection 8, union 8 + 10 - 8 = 10, IoU 0.8 -> TP.
#   p2/g2 person: intersection 3, union 6 + 6 - 3 - 3 (p2 on void) = 6, IoU 0.5, not > 0.5;
#     g2 is a FN; p2 lies 3/6 = 0.5 on void, not more than half -> FP.
#   p3 car: 6 of its 8 px on the crowd car region (0.75 > 0.5) -> ignored; the crowd segment
#     is neither matched nor a FN.
#   p4 person: 1 of 3 px on void; the crowd region is a car's, not a person's -> FP.
#   p5/g4 sky: IoU 12 / 12 = 1 -> TP.
# Image 2: car IoU 10 / (12 + 10 - 10) = 5/6 TP; grass IoU 12 / (12 + 20 - 12) = 0.6 TP; road
#   FP.
# Per category (iou sum, TP, FP, FN) and PQ = iou / (TP + FP/2 + FN/2), SQ = iou / TP,
# RQ = TP / (TP + FP/2 + FN/2):
#   person (0.8, 1, 2, 1): PQ 0.8 / 2.5 = 0.32, SQ 0.8, RQ 0.4
#   car    (5/6, 1, 0, 0): PQ 5/6, SQ 5/6, RQ 1
#   dog    nothing: left out
#   sky    (1, 1, 0, 0): 1, 1, 1
#   grass  (0.6, 1, 0, 0): 0.6, 0.6, 1    (absent from image 1)
#   road   (0, 0, 1, 0): 0, 0, 0
PER_CLASS = {"person": (0.32, 0.8, 0.4), "car": (5 / 6, 5 / 6, 1.0), "sky": (1.0, 1.0, 1.0),
             "grass": (0.6, 0.6, 1.0), "road": (0.0, 0.0, 0.0)}
EXPECTED = {
    "PQ": (0.32 + 5 / 6 + 1 + 0.6 + 0) / 5, "SQ": (0.8 + 5 / 6 + 1 + 0.6 + 0) / 5,
    "RQ": (0.4 + 1 + 1 + 1 + 0) / 5,
    "PQ_th": (0.32 + 5 / 6) / 2, "SQ_th": (0.8 + 5 / 6) / 2, "RQ_th": (0.4 + 1) / 2,
    "PQ_st": (1 + 0.6 + 0) / 3, "SQ_st": (1 + 0.6 + 0) / 3, "RQ_st": (1 + 1 + 0) / 3,
}


def _check(res):
    for key, value in EXPECTED.items():
        assert res[key] == pytest.approx(100 * value, abs=1e-9), key
    assert (res["n"], res["n_th"], res["n_st"]) == (5, 2, 3)
    for name, (pq, sq, rq) in PER_CLASS.items():
        assert res[f"PQ-{name}"] == pytest.approx(100 * pq)
        assert res[f"SQ-{name}"] == pytest.approx(100 * sq)
        assert res[f"RQ-{name}"] == pytest.approx(100 * rq)
    assert np.isnan(res["PQ-dog"])


def test_pq_by_hand_with_void_crowd_and_absent_classes():
    s1 = pq_stats(GT1, GT1_SEGS, PRED1, PRED1_SEGS, CAT_IDS)
    np.testing.assert_allclose(s1[0], [0.8, 1, 2, 1])  # person
    np.testing.assert_allclose(s1[1], [0, 0, 0, 0])  # car: crowd and its prediction ignored
    np.testing.assert_allclose(s1[3], [1, 1, 0, 0])  # sky
    s2 = pq_stats(GT2, GT2_SEGS, PRED2, PRED2_SEGS, CAT_IDS)
    np.testing.assert_allclose(s2[1], [5 / 6, 1, 0, 0])
    np.testing.assert_allclose(s2[4:], [[0.6, 1, 0, 0], [0, 0, 1, 0]])
    _check(pq_from_stats(s1 + s2, ISTHING, [c["name"] for c in CATEGORIES]))


def test_prediction_mostly_on_void_or_on_its_own_crowd_is_not_a_false_positive():
    gt = runs((0, 0, 4), (1, 4, 10))
    segs = [{"id": 1, "category_id": 2, "iscrowd": 1}]
    for cat, fp in ((2, 0), (1, 1)):
        pred = runs((1, 0, 3), (2, 3, 7), (1, 7, 9), (0, 9, 10))
        pred_segs = [{"id": 1, "category_id": cat}, {"id": 2, "category_id": cat}]
        s = pq_stats(gt, segs, pred, pred_segs, CAT_IDS)
        # segment 1: 3 void + 2 crowd px of 5; segment 2: 1 void + 3 crowd px of 4. For a car
        # both are ignored; for a person only segment 1 (3/5 void), segment 2 is a FP
        assert s[CAT_IDS.index(cat), 2] == fp
        assert s[:, 3].sum() == 0  # a crowd segment is never a false negative


def test_bad_ids_name_the_image():
    pred = PRED2.copy()
    pred[0, 0] = 99
    with pytest.raises(PanopticFormatError, match=r"img7.png \(prediction\).*\[99\].*no segment"):
        pq_stats(GT2, GT2_SEGS, pred, PRED2_SEGS, CAT_IDS, source="img7.png")
    with pytest.raises(PanopticFormatError, match=r"segments \[5\] .* no pixel"):
        pq_stats(GT2, GT2_SEGS + [{"id": 5, "category_id": 1, "iscrowd": 0}], PRED2, PRED2_SEGS,
                 CAT_IDS)
    with pytest.raises(PanopticFormatError, match="unknown category_id 4"):
        pq_stats(GT2, GT2_SEGS, PRED2, [dict(PRED2_SEGS[0], category_id=4), *PRED2_SEGS[1:]],
                 CAT_IDS)


def test_id_encoding_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 5001, 256**3 - 1]])
    rgb = id2rgb(ids)
    assert rgb[1, 2].tolist() == [5001 % 256, 5001 // 256, 0]
    np.testing.assert_array_equal(rgb2id(rgb), ids)


def test_evaluator_through_png_files_and_model_labels(tmp_path):
    """The model's labels: things contiguous (person 0, car 1, dog 2), stuff by semantic label
    (sky 1, grass 2, road 3; 0 is the things class)."""
    ev = PanopticEvaluator(categories=CATEGORIES, thing_ids=[1, 2, 3], stuff_ids=[10, 11, 12],
                           output_dir=tmp_path / "out")
    model_cat = {1: (0, True), 2: (1, True), 10: (1, False), 11: (2, False), 12: (3, False)}
    inputs, outputs = [], []
    for k, (gt, gt_segs, pred, pred_segs) in enumerate(
            ((GT1, GT1_SEGS, PRED1, PRED1_SEGS), (GT2, GT2_SEGS, PRED2, PRED2_SEGS))):
        path = tmp_path / f"gt{k}.png"
        Image.fromarray(id2rgb(gt)).save(path)
        inputs.append({"pan_seg_file_name": str(path), "segments_info": gt_segs, "image_id": k})
        segs = [{"id": s["id"], "category_id": model_cat[s["category_id"]][0],
                 "isthing": model_cat[s["category_id"]][1], "score": 0.9} for s in pred_segs]
        outputs.append({"panoptic_seg": torch.from_numpy(pred).int(),
                        "segments_info": segs})
    ev.process(inputs[:1], outputs[:1])
    ev.process(inputs[1:], outputs[1:])
    _check(ev.evaluate()["panoptic_seg"])
    # the predictions in COCO panoptic format, with dataset category ids
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    ann = saved["annotations"][1]
    assert [s["category_id"] for s in ann["segments_info"]] == [2, 12, 11]
    assert [s["area"] for s in ann["segments_info"]] == [12, 6, 12]
    png = np.asarray(Image.open(tmp_path / "out" / "predictions" / ann["file_name"]))
    np.testing.assert_array_equal(rgb2id(png), PRED2)
    ev.reset()
    assert ev.num_images == 0 and not ev.stats.any()


def _case(k, folder):
    """Image k of the hand example as the evaluator's input and the model's output."""
    gt, gt_segs, pred, pred_segs = ((GT1, GT1_SEGS, PRED1, PRED1_SEGS),
                                    (GT2, GT2_SEGS, PRED2, PRED2_SEGS))[k]
    model_cat = {1: (0, True), 2: (1, True), 10: (1, False), 11: (2, False), 12: (3, False)}
    segs = [{"id": s["id"], "category_id": model_cat[s["category_id"]][0],
             "isthing": model_cat[s["category_id"]][1]} for s in pred_segs]
    inp = {"pan_seg_file_name": str(folder / f"gt{k}.png"), "segments_info": gt_segs,
           "image_id": k}
    return inp, {"panoptic_seg": torch.from_numpy(pred).int(), "segments_info": segs}


def _dist_worker(rank: int, world: int, folder: str) -> None:
    from pathlib import Path

    import torch.distributed as dist

    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'init'}", rank=rank,
                            world_size=world)
    try:
        ev = PanopticEvaluator(categories=CATEGORIES, thing_ids=[1, 2, 3],
                               stuff_ids=[10, 11, 12], output_dir=folder / "out")
        inp, out = _case(rank, folder)  # each rank sees one of the two images
        ev.process([inp], [out])
        res = ev.evaluate()
        if rank == 0:
            (folder / "result.json").write_text(json.dumps(res["panoptic_seg"]))
        else:
            assert res == {}
    finally:
        dist.destroy_process_group()


@pytest.mark.starts_processes
def test_distributed_statistics_are_summed(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    for k, gt in enumerate((GT1, GT2)):
        Image.fromarray(id2rgb(gt)).save(tmp_path / f"gt{k}.png")
    here = Path(__file__).resolve().parent
    code = ("import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); "
            "from test_panoptic_quality import _dist_worker; "
            "mp.spawn(_dist_worker, args=(2, sys.argv[2]), nprocs=2)")
    res = subprocess.run([sys.executable, "-c", code, str(here), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    _check({k: (float("nan") if v is None else v) for k, v in result.items()})
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(a["image_id"] for a in saved["annotations"]) == [0, 1]  # gathered from both
