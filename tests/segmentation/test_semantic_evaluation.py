"""mIoU and accuracies from one dataset-level confusion matrix, against values worked by hand."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segmentation.semantic import SemSegEvaluator, confusion_matrix, metrics_from_confusion

IGNORE = 255


def _logits(pred: torch.Tensor, k: int) -> torch.Tensor:
    """(H, W) labels -> (K, H, W) logits whose argmax is ``pred``."""
    return torch.nn.functional.one_hot(pred, k).permute(2, 0, 1).float()


def test_miou_by_hand_with_ignore_and_absent_classes():
    # 4 classes. Class 3 is in no ground truth and never predicted: left out of the mean.
    gt1 = torch.tensor([[0, 0, 1, 1],
                        [0, IGNORE, 1, 1]])
    pr1 = torch.tensor([[0, 1, 1, 1],
                        [0, 2, 1, 0]])     # the ignored pixel's prediction (2) counts for nothing
    gt2 = torch.tensor([[2, 2, 0, IGNORE]])
    pr2 = torch.tensor([[2, 0, 0, 1]])
    ev = SemSegEvaluator(num_classes=4, ignore_label=IGNORE, class_names=["a", "b", "c", "d"])
    ev.process([{"sem_seg": gt1}, {"sem_seg": gt2}],
               [{"sem_seg": _logits(pr1, 4)}, {"sem_seg": _logits(pr2, 4)}])
    res = ev.evaluate()["sem_seg"]
    # the pooled matrix [gt, pred] over the 10 labelled pixels:
    #   gt 0: pred 0 x3 (two in image 1, one in image 2), pred 1 x1  -> 4 pixels
    #   gt 1: pred 1 x3, pred 0 x1                                    -> 4 pixels
    #   gt 2: pred 2 x1, pred 0 x1                                    -> 2 pixels
    expected = torch.tensor([[3, 1, 0, 0], [1, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(ev.matrix, expected)
    iou0 = 3 / (4 + 5 - 3)  # gt 4, predicted 5 (3 + 1 + 1)
    iou1 = 3 / (4 + 4 - 3)
    iou2 = 1 / (2 + 1 - 1)
    assert res["IoU-a"] == pytest.approx(100 * iou0)
    assert res["IoU-b"] == pytest.approx(100 * iou1)
    assert res["IoU-c"] == pytest.approx(100 * iou2)
    assert math.isnan(res["IoU-d"])
    assert res["mIoU"] == pytest.approx(100 * (iou0 + iou1 + iou2) / 3)
    assert res["pACC"] == pytest.approx(100 * 7 / 10)
    assert res["mACC"] == pytest.approx(100 * (3 / 4 + 3 / 4 + 1 / 2) / 3)
    assert res["fwIoU"] == pytest.approx(100 * (4 * iou0 + 4 * iou1 + 2 * iou2) / 10)


def test_one_dataset_level_matrix_not_a_mean_of_images():
    # class 1 is perfect in a big image and absent (but falsely predicted once) in a small one;
    # a per-image mean would count the small image's IoU 0 as much as the big one's.
    gt_big, pr_big = torch.ones(10, 10, dtype=torch.long), torch.ones(10, 10, dtype=torch.long)
    gt_small = torch.zeros(1, 2, dtype=torch.long)
    pr_small = torch.tensor([[0, 1]])
    ev = SemSegEvaluator(num_classes=2)
    ev.process([{"sem_seg": gt_big}, {"sem_seg": gt_small}],
               [{"sem_seg": pr_big}, {"sem_seg": pr_small}])
    res = ev.evaluate()["sem_seg"]
    assert res["IoU-1"] == pytest.approx(100 * 100 / 101)
    assert res["IoU-0"] == pytest.approx(100 * 1 / 2)


def test_perfect_prediction_is_100_and_reset_clears():
    gt = torch.tensor([[0, 1, 2, IGNORE]])
    ev = SemSegEvaluator(num_classes=5)
    ev.process([{"sem_seg": gt}], [{"sem_seg": torch.tensor([[0, 1, 2, 4]])}])
    res = ev.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0) and res["pACC"] == pytest.approx(100.0)
    ev.reset()
    assert int(ev.matrix.sum()) == 0


def test_labels_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match=r"\[7\].*outside 0\.\.2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3, IGNORE)
    ev = SemSegEvaluator(num_classes=3)
    with pytest.raises(ValueError, match="lbl.png"):
        ev.process([{"sem_seg": torch.tensor([[9]]), "sem_seg_file_name": "lbl.png"}],
                   [{"sem_seg": torch.tensor([[0]])}])


def test_metrics_need_matching_names():
    with pytest.raises(ValueError):
        metrics_from_confusion(torch.eye(3, dtype=torch.long), ["a", "b"])


def _dist_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        ev = SemSegEvaluator(num_classes=3)
        gt = torch.randint(0, 3, (6, 7), generator=g)
        ev.process([{"sem_seg": gt}], [{"sem_seg": torch.randint(0, 3, (6, 7), generator=g)}])
        res = ev.evaluate()
        if rank == 0:
            torch.save(res["sem_seg"]["mIoU"], out_file)
        else:
            assert res == {}
    finally:
        dist.destroy_process_group()


@pytest.mark.starts_processes
def test_distributed_matrices_are_summed(tmp_path):
    out = tmp_path / "miou.pt"
    # The two gloo ranks are spawned from a fresh interpreter (see tests/conftest.py).
    here = Path(__file__).resolve().parent
    code = ("import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); "
            "from test_semantic_evaluation import _dist_worker; "
            "mp.spawn(_dist_worker, args=(2, sys.argv[2], sys.argv[3]), nprocs=2)")
    res = subprocess.run([sys.executable, "-c", code, str(here), str(tmp_path / "init"),
                          str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    single = SemSegEvaluator(num_classes=3)
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        gt = torch.randint(0, 3, (6, 7), generator=g)
        single.process([{"sem_seg": gt}],
                       [{"sem_seg": torch.randint(0, 3, (6, 7), generator=g)}])
    assert torch.load(out) == pytest.approx(single.evaluate()["sem_seg"]["mIoU"])
