"""Kill at any moment, lose nothing: SIGKILL mid-step, mid-checkpoint-write and mid-evaluation,
SIGTERM/SIGINT, corrupt and half-written checkpoints, AMP scaler state.

The killed runs are real ``tools/train_det.py`` processes (``fault_inject.py`` patches them from
outside); each resumed run must end with the uninterrupted run's weights and optimizer state,
bit for bit. The uninterrupted run uses no loader worker and the interrupted ones 1 or 2, so
the equality also shows that workers do not change the stream.
"""

import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detection.data import shapes
from detection.engine.checkpoint import Checkpointer, get_rng_state, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("fault_inject.py")
MAX_ITER = 5  # checkpoints after 2 and 4, evaluation after 3, final after 5


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    p = shapes.ensure_shapes_dataset(root=root, num_train=12, num_val=6, image_size=(96, 128))
    return f"{p.train_json}:{p.train_images}", f"{p.val_json}:{p.val_images}"


def train_args(tiny_data, out: Path, workers: int) -> list:
    train, val = tiny_data
    opts = {
        "DATASETS.TRAIN": f"('{train}',)", "DATASETS.TEST": f"('{val}',)",
        "DATALOADER.NUM_WORKERS": workers, "SOLVER.IMS_PER_BATCH": 2,
        "SOLVER.MAX_ITER": MAX_ITER, "SOLVER.WARMUP_ITERS": 2, "SOLVER.CHECKPOINT_PERIOD": 2,
        "TEST.EVAL_PERIOD": 3, "SOLVER.LOG_PERIOD": 1,
        "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 96,
        "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 96,
        "MODEL.FPN.OUT_CHANNELS": 16, "MODEL.ROI_BOX_HEAD.FC_DIM": 32, "OUTPUT_DIR": str(out),
    }
    flat = [str(REPO / "tools" / "train_det.py"), "--config", "faster_rcnn_r18_fpn_shapes.yaml"]
    for k, v in opts.items():
        flat += [k, str(v)]
    return flat


def run_train(tiny_data, out: Path, *, workers: int = 0, fault: str = "", resume: bool = False,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``tools/train_det.py`` in a child process, with ``fault`` injected (see fault_inject)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DETKIT_FAULT=fault)
    cmd = [sys.executable, str(INJECT), *train_args(tiny_data, out, workers)]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def assert_same_state(got: dict, want: dict) -> None:
    """Model, optimizer and scheduler state equal bit for bit."""
    assert got["iteration"] == want["iteration"]
    assert got["model"].keys() == want["model"].keys()
    diff = {k: (got["model"][k].double() - v.double()).abs().max().item()
            for k, v in want["model"].items() if not torch.equal(got["model"][k], v)}
    assert not diff, f"weights differ from the uninterrupted run's: {diff}"
    go, wo = got["optimizer"], want["optimizer"]
    assert go["param_groups"] == wo["param_groups"]
    assert go["state"].keys() == wo["state"].keys()
    for i, s in wo["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(go["state"][i][k]), torch.as_tensor(v)), (i, k)
    assert got["scheduler"] == want["scheduler"]


def all_checkpoints_readable(out: Path) -> list:
    """Every ``*.pth`` in ``out`` loads; returns their names."""
    names = sorted(p.name for p in out.glob("*.pth"))
    for name in names:
        load_checkpoint(out / name)
    return names


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run's final checkpoint (no loader worker)."""
    out = tmp_path_factory.mktemp("straight")
    res = run_train(tiny_data, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_checkpoint(out / "model_final.pth")


@pytest.mark.slow
def test_sigkill_mid_step_then_mid_checkpoint_write_then_resume_is_exact(
        tiny_data, reference, tmp_path):
    out = tmp_path / "run"
    # killed inside iteration 3's optimizer step: the checkpoint of iteration 2 is the last
    res = run_train(tiny_data, out, workers=2, fault="kill-step:3")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert all_checkpoints_readable(out) == ["model_0000002.pth"]
    # resumed, then killed halfway through writing the checkpoint of iteration 4
    res = run_train(tiny_data, out, workers=1, fault="kill-write:4", resume=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert "Resumed from" in res.stderr and "model_0000002.pth at iteration 2" in res.stderr
    stray = list(out.glob(".model_0000004.pth.*.tmp"))
    assert len(stray) == 1 and stray[0].stat().st_size > 1000  # half a file, never a .pth
    assert all_checkpoints_readable(out) == ["model_0000002.pth"]
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    # resumed again: the half-written file is removed, and the run ends where the
    # uninterrupted one did
    res = run_train(tiny_data, out, workers=0, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Removing" in res.stderr and not list(out.glob(".*.tmp"))
    assert_same_state(load_checkpoint(out / "model_final.pth"), reference)


@pytest.mark.slow
def test_sigkill_mid_evaluation_then_resume_is_exact(tiny_data, reference, tmp_path):
    out = tmp_path / "run"
    # killed while evaluating after iteration 3 (the evaluation draws from torch's RNG:
    # without restoring it the resumed run would diverge at iteration 4)
    res = run_train(tiny_data, out, workers=1, fault="kill-eval:3")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert all_checkpoints_readable(out) == ["model_0000002.pth"]
    # resumed, then killed during the final evaluation (model_final.pth already written)
    res = run_train(tiny_data, out, workers=0, fault=f"kill-eval:{MAX_ITER}", resume=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert_same_state(load_checkpoint(out / "model_final.pth"), reference)
    # resumed from model_final.pth: nothing to train, the evaluation runs again
    res = run_train(tiny_data, out, workers=0, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"model_final.pth at iteration {MAX_ITER}" in res.stderr and "| bbox |" in res.stdout
    assert_same_state(load_checkpoint(out / "model_final.pth"), reference)


@pytest.mark.slow
def test_sigterm_saves_the_current_iteration_and_resume_is_exact(tiny_data, reference,
                                                                  tmp_path):
    out = tmp_path / "run"
    res = run_train(tiny_data, out, workers=2, fault="term-step:3")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "Stopped by SIGTERM at iteration 3" in res.stderr
    assert all_checkpoints_readable(out) == ["model_0000002.pth", "model_0000003.pth"]
    assert load_checkpoint(out / "model_0000003.pth")["iteration"] == 3
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    res = run_train(tiny_data, out, workers=0, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model_0000003.pth at iteration 3" in res.stderr
    assert_same_state(load_checkpoint(out / "model_final.pth"), reference)
