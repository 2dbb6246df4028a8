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

pytestmark = pytest.mark.starts_processes  # see tests/conftest.py

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("fault_inject.py")
MAX_ITER = 5  # checkpoints after 2 and 4, evaluation after 3, final after 5


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    p = shapes.ensure_shapes_dataset(root=root, num_train=12, num_val=2, image_size=(96, 128))
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


# ---- in-process: the same machinery on a tiny model, fast ----------------------------------

class TinyModel(torch.nn.Module):
    """The detector's training call, ``(images, targets) -> losses``, on a few layers. Dropout
    draws from torch's global RNG as the detector's RPN/RoI samplers do; BatchNorm has
    running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, images, targets=None):
        x = self.drop(self.bn(self.conv(torch.stack(images))).mean((2, 3)))
        out = self.fc(x).squeeze(1)
        want = torch.stack([t["value"] for t in targets])
        return {"loss_fit": ((out - want) ** 2).mean(), "loss_l1": 0.1 * out.abs().mean()}


def tiny_stream(start_iter: int = 0, on_batch=None):
    """Batch i depends on i only (as the real loader's ``start_iter`` guarantees)."""
    i = start_iter
    while True:
        g = torch.Generator().manual_seed(i)
        if on_batch is not None:
            on_batch(i)
        yield [{"image": torch.rand(3, 8, 8, generator=g),
                "instances": {"value": torch.rand((), generator=g)}} for _ in range(2)]
        i += 1


def tiny_trainer(out: Path, *, resume: bool, max_iter: int = 6, scaler=None, on_batch=None,
                 evaluate_fn=None, eval_period: int = 0):
    """(trainer, checkpointer) on TinyModel, resumed from ``out`` when asked."""
    from detection.engine.trainer import Trainer

    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ckpt = Checkpointer(out, model=model, optimizer=opt, scheduler=sched)
    start = ckpt.resume() if resume else 0
    trainer = Trainer(model=model, optimizer=opt, scheduler=sched,
                      data_loader=tiny_stream(start, on_batch), checkpointer=ckpt,
                      max_iter=max_iter, start_iter=start, checkpoint_period=2,
                      progress=False, grad_scaler=scaler, evaluate_fn=evaluate_fn,
                      eval_period=eval_period)
    return trainer, ckpt


def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path,
                                                                           monkeypatch):
    import detection.atomic_files as af

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(af.os, "fsync", lambda fd: (events.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"), real_fsync(fd))[1])
    monkeypatch.setattr(af.os, "replace", lambda a, b: (events.append("rename"),
                                                        real_replace(a, b))[1])
    af.atomic_write_text(tmp_path / "last_checkpoint", "model_0000002.pth")
    assert events == ["file", "rename", "dir"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]  # no temporary file left

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        af.atomic_write(tmp_path / "model_0000004.pth", failing)
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_resume_takes_the_newest_readable_checkpoint_and_names_the_bad_one(tmp_path, caplog):
    trainer, ckpt = tiny_trainer(tmp_path, resume=False)
    trainer.run()  # model_0000002, model_0000004, model_final (6)
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")  # the pointer lags
    (tmp_path / ".model_0000008.pth.abc123.tmp").write_bytes(b"half a checkpoint")
    _, ckpt = tiny_trainer(tmp_path, resume=False)
    with caplog.at_level(logging.INFO):
        assert ckpt.resume() == 6
    assert ckpt.resumed_from.name == "model_final.pth"
    assert not (tmp_path / ".model_0000008.pth.abc123.tmp").exists()  # stray file removed
    assert "Removing" in caplog.text and ".model_0000008.pth.abc123.tmp" in caplog.text
    # a corrupt newest checkpoint (copied by hand, disk trouble): fall back, loudly
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])
    caplog.clear()
    _, ckpt = tiny_trainer(tmp_path, resume=False)
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume() == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model_final.pth is unreadable" in r.getMessage() for r in warnings)
    # none readable: an error naming them, never a silent start from scratch
    for name in ("model_0000002.pth", "model_0000004.pth"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    _, ckpt = tiny_trainer(tmp_path, resume=False)
    with pytest.raises(RuntimeError, match=r"no readable checkpoint.*model_0000004\.pth"):
        ckpt.resume()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_grad_scaler_state_round_trip_and_exact_resume(tmp_path):  # (skipped steps warn)
    def scaler():  # a real AMP scaler: starts at an overflowing scale, backs off, then grows
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=2)

    straight, _ = tiny_trainer(tmp_path / "straight", resume=False, scaler=scaler())
    straight.run()
    want = load_checkpoint(tmp_path / "straight" / "model_final.pth")
    assert want["extra"]["grad_scaler"]["scale"] < 2.0 ** 127  # it did back off
    mid = load_checkpoint(tmp_path / "straight" / "model_0000004.pth")["extra"]["grad_scaler"]
    assert mid != want["extra"]["grad_scaler"]

    # resume before the scaler exists (as the runner does), then the trainer registers it
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "model_0000004.pth").write_bytes(
        (tmp_path / "straight" / "model_0000004.pth").read_bytes())
    resumed, ckpt = tiny_trainer(out, resume=True, scaler=scaler())
    assert resumed.start_iter == 4 and resumed.scaler.state_dict() == mid
    resumed.run()
    got = load_checkpoint(out / "model_final.pth")
    assert got["extra"]["grad_scaler"] == want["extra"]["grad_scaler"]
    assert_same_state(got, want)
    # and registered before the resume
    model = TinyModel()
    ckpt = Checkpointer(out, model=model)
    fresh = scaler()
    ckpt.register("grad_scaler", fresh)
    ckpt.resume()
    assert fresh.state_dict() == want["extra"]["grad_scaler"]


def test_sigint_saves_the_current_iteration_and_a_second_one_stops_at_once(tmp_path):
    from detection.engine.trainer import TrainingInterrupted

    draws = []  # evaluation draws from the global RNGs; training must not notice

    def evaluate():
        draws.append(torch.rand(3))
        return {"bbox": {"AP": 1.0}}

    straight, _ = tiny_trainer(tmp_path / "straight", resume=False, evaluate_fn=evaluate,
                               eval_period=1)
    straight.run()
    want = load_checkpoint(tmp_path / "straight" / "model_final.pth")

    def ctrl_c_at(iteration, times=1):
        def on_batch(i):
            if i == iteration - 1:  # while fetching the batch of that iteration
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
        return on_batch

    out = tmp_path / "run"
    trainer, _ = tiny_trainer(out, resume=False, on_batch=ctrl_c_at(3), evaluate_fn=evaluate,
                              eval_period=1)
    # Python's own handler, or SIG_IGN where the suite was started with SIGINT ignored
    # (nohup, a background job of a non-interactive shell)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    assert info.value.code == 130 and info.value.iteration == 3
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert load_checkpoint(out / "model_0000003.pth")["iteration"] == 3
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    resumed, _ = tiny_trainer(out, resume=True, evaluate_fn=evaluate, eval_period=1)
    assert resumed.start_iter == 3
    resumed.run()
    assert_same_state(load_checkpoint(out / "model_final.pth"), want)
    # Ctrl-C twice: stop at once (nothing saved for that iteration)
    trainer, _ = tiny_trainer(tmp_path / "twice", resume=False, on_batch=ctrl_c_at(3, times=2))
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "twice").glob("*.pth")) == ["model_0000002.pth"]


def test_evaluation_leaves_the_training_rng_where_it_was(tmp_path):
    import random

    import numpy as np

    def evaluate():  # what a test loader and an evaluator may draw
        torch.rand(5), np.random.rand(5), random.random()
        return {}

    trainer, _ = tiny_trainer(tmp_path, resume=False, evaluate_fn=evaluate, eval_period=1)
    before = get_rng_state()
    trainer._evaluate(1)
    after = get_rng_state()
    assert torch.equal(before["torch"], after["torch"])
    assert torch.equal(before["numpy"][1], after["numpy"][1])
    assert before["python"] == after["python"]


def test_resume_from_a_checkpoint_written_before_an_evaluation_is_exact(tmp_path):
    def evaluate():  # creating a test loader's iterator draws from torch's RNG like this
        torch.empty((), dtype=torch.int64).random_()
        return {}

    straight, _ = tiny_trainer(tmp_path / "straight", resume=False, evaluate_fn=evaluate,
                               eval_period=1)
    straight.run()
    out = tmp_path / "resumed"
    out.mkdir()  # the run was killed after writing model_0000002.pth, during the evaluation
    (out / "model_0000002.pth").write_bytes(
        (tmp_path / "straight" / "model_0000002.pth").read_bytes())
    resumed, _ = tiny_trainer(out, resume=True, evaluate_fn=evaluate, eval_period=1)
    resumed.run()
    assert_same_state(load_checkpoint(out / "model_final.pth"),
                      load_checkpoint(tmp_path / "straight" / "model_final.pth"))
