"""Training engine: exact resume, NaN stop, schedules, DDP over gloo, and the command line."""

import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from backbones.machine import parse_cpuinfo, simulate_cpu
from detection.config import load_config
from detection.data import shapes
from detection.engine.checkpoint import load_checkpoint
from detection.engine.evaluation import evaluate
from detection.engine.loading import attach_dataset_metadata, build_model_from_cfg
from detection.engine.run_setup import seed_all
from detection.engine.solver import build_lr_scheduler, build_optimizer
from detection.engine.train_net import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    p = shapes.ensure_shapes_dataset(root=root, num_train=12, num_val=6, image_size=(96, 128))
    return f"{p.train_json}:{p.train_images}", f"{p.val_json}:{p.val_images}"


def tiny_opts(tiny_data, out, **extra):
    train, val = tiny_data
    opts = {
        "DATASETS.TRAIN": f"('{train}',)", "DATASETS.TEST": f"('{val}',)",
        "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.MAX_ITER": 6,
        "SOLVER.WARMUP_ITERS": 2, "SOLVER.CHECKPOINT_PERIOD": 3, "SOLVER.LOG_PERIOD": 1,
        "INPUT.MIN_SIZE_TRAIN": "(96,)", "INPUT.MAX_SIZE_TRAIN": 128,
        "INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 128,
        "MODEL.FPN.OUT_CHANNELS": 32, "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
        # the same model on every CPU (the float32 recipe has its own RPN levels)
        "SOLVER.AMP.FALLBACK_OPTS": "[]",
        "OUTPUT_DIR": str(out),
    }
    opts.update(extra)
    flat = []
    for k, v in opts.items():
        flat += [k, str(v)]
    return flat


def tiny_cfg(tiny_data, out, **extra):
    return load_config("faster_rcnn_r18_fpn_shapes.yaml", tiny_opts(tiny_data, out, **extra))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path,
                                                               monkeypatch):
    straight = tiny_cfg(tiny_data, tmp_path / "straight", **{"DATASETS.TEST": "()"})
    train(straight)
    want = load_checkpoint(tmp_path / "straight" / "model_final.pth")

    # A run killed during iteration 5, after the checkpoint at iteration 3 ...
    import detection.data.build as data_build

    real = data_build.build_train_loader

    def crashing_loader(cfg, **kw):
        def gen():
            for i, batch in enumerate(real(cfg, **kw)):
                if i == 4:
                    raise KeyboardInterrupt("killed")
                yield batch
        return gen()

    killed = tiny_cfg(tiny_data, tmp_path / "resumed", **{"DATASETS.TEST": "()"})
    monkeypatch.setattr(data_build, "build_train_loader", crashing_loader)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    monkeypatch.setattr(data_build, "build_train_loader", real)
    assert (tmp_path / "resumed" / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "resumed" / "model_final.pth").exists()
    # ... and resumed, continues to the same weights.
    train(tiny_cfg(tiny_data, tmp_path / "resumed", **{"DATASETS.TEST": "()"}),
                 resume=True)
    got = load_checkpoint(tmp_path / "resumed" / "model_final.pth")
    assert got["iteration"] == want["iteration"] == 6
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert got["optimizer"]["param_groups"][0]["lr"] == want["optimizer"]["param_groups"][0][
        "lr"]
    # each iteration is logged once: the killed run's records after the checkpoint are gone
    from detection.engine.events import read_metrics

    def logged(run):
        return [r["iteration"] for r in read_metrics(tmp_path / run / "metrics.json")
                if "total_loss" in r]

    assert logged("resumed") == logged("straight") and len(logged("straight")) >= 2
    # the checkpoint alone says what the model is
    assert "NUM_CLASSES: 4" in got["config"]
    assert got["metadata"]["class_names"] == ["circle", "rectangle", "triangle", "cross"]


class _NaNAfter(torch.nn.Module):
    """The real detector, whose losses turn NaN from the ``n``-th training call on."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, images, targets=None):
        losses = self.model(images, targets)
        self.calls += 1
        if self.calls >= self.n:
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    from detection.data.build import build_train_loader
    from detection.engine.checkpoint import Checkpointer
    from detection.engine.trainer import Trainer

    cfg = tiny_cfg(tiny_data, tmp_path)
    attach_dataset_metadata(cfg)
    model = build_model_from_cfg(cfg)
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    ckpt = Checkpointer(tmp_path, model=model, optimizer=opt, scheduler=sched)
    trainer = Trainer(model=_NaNAfter(model, 5), optimizer=opt, scheduler=sched,
                      data_loader=build_train_loader(cfg), checkpointer=ckpt, max_iter=6,
                      checkpoint_period=3, progress=False)
    with pytest.raises(FloatingPointError, match=r"iteration 5: .*loss_box_reg=nan"):
        trainer.run()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    state = load_checkpoint(tmp_path / "model_0000003.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model_final.pth").exists()


def test_amp_on_cpu_trains_in_bf16_autocast_with_float32_weights(tiny_data, tmp_path, caplog):
    """SOLVER.AMP.ENABLED on a CPU: torch.autocast in bf16 (no GradScaler), so the convs
    run in bf16 while parameters, gradients and the losses stay float32; on a CPU without
    native bf16 it is ignored with a warning."""
    import copy

    from detection.data.build import build_train_loader
    from detection.engine import trainer as trainer_module
    from detection.engine.trainer import Trainer

    cfg = tiny_cfg(tiny_data, tmp_path)
    attach_dataset_metadata(cfg)
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg)
    batch = next(iter(build_train_loader(cfg)))

    def step(amp):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        t = Trainer(model=m, optimizer=opt, scheduler=build_lr_scheduler(cfg, opt),
                    data_loader=[], checkpointer=None, max_iter=1, progress=False, amp=amp)
        dtypes = []
        first_conv = next(x for x in m.modules() if isinstance(x, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
        torch.manual_seed(1)  # the same proposal sampling in both runs
        values = t.run_step(batch)
        grads = [p.grad.dtype for p in m.parameters() if p.grad is not None]
        return t, values, dtypes, grads, m

    avx2 = parse_cpuinfo((Path(__file__).parents[1] / "backbones" / "data"
                          / "cpuinfo_amd_epyc_zen3_avx2.txt").read_text())
    with simulate_cpu(avx2), caplog.at_level("WARNING"):  # no native bf16
        t, _, d, _, _ = step(True)
    assert not t.amp and d == [torch.float32]
    assert "SOLVER.AMP.ENABLED is ignored on cpu" in caplog.text

    if trainer_module.amp_dtype(torch.device("cpu")) is None:
        pytest.skip("this CPU has no native bf16: SOLVER.AMP.ENABLED is ignored here")
    t32, v32, d32, _, _ = step(False)
    t16, v16, d16, grads, m16 = step(True)
    assert not t32.amp and t16.amp and t16.amp_dtype == torch.bfloat16 and t16.scaler is None
    assert d32 == [torch.float32] and d16 == [torch.bfloat16]
    assert grads and set(grads) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    for k in v32:  # the same losses up to bf16's rounding, but not bit-equal
        assert abs(v16[k] - v32[k]) <= 0.05 * abs(v32[k]) + 1e-3, (k, v16[k], v32[k])
    assert v16["total_loss"] != v32["total_loss"]


def test_amp_fallback_recipe_applies_only_where_autocast_cannot_run(caplog):
    """SOLVER.AMP.FALLBACK_OPTS replace the config's values on a CPU without native bf16
    (logged; merged once), and leave them alone on an AMX CPU or with AMP off."""
    from detection.engine.train_net import apply_amp_fallback

    data = Path(__file__).resolve().parents[1] / "backbones" / "data"
    avx2 = parse_cpuinfo((data / "cpuinfo_amd_epyc_zen3_avx2.txt").read_text())
    amx = parse_cpuinfo((data / "cpuinfo_intel_xeon_sapphire_rapids_amx.txt").read_text())
    opts = ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.FALLBACK_OPTS",
            "['SOLVER.MAX_ITER', '300', 'INPUT.MIN_SIZE_TRAIN', '(144, 160)']"]
    with simulate_cpu(amx):
        cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", opts)
        assert not apply_amp_fallback(cfg) and cfg.SOLVER.MAX_ITER == 500
    cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", opts[2:] + ["SOLVER.AMP.ENABLED", "False"])
    with simulate_cpu(avx2):
        assert not apply_amp_fallback(cfg) and cfg.SOLVER.MAX_ITER == 500
        cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", opts)
        with caplog.at_level("INFO", logger="detection.train"):
            assert apply_amp_fallback(cfg)
        assert cfg.SOLVER.MAX_ITER == 300 and tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (144, 160)
        assert list(cfg.SOLVER.AMP.FALLBACK_OPTS) == [] and not apply_amp_fallback(cfg)
        assert "SOLVER.MAX_ITER=300" in caplog.text and "AMD EPYC" in caplog.text
        # a key given on the command line wins over the fallback recipe's
        cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", opts + ["SOLVER.MAX_ITER", "7"])
        assert apply_amp_fallback(cfg)
        assert cfg.SOLVER.MAX_ITER == 7 and tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (144, 160)
        bad = load_config("faster_rcnn_r18_fpn_shapes.yaml",
                          opts[:3] + ["['SOLVER.MAX_ITER']"])
        with pytest.raises(ValueError, match="KEY VALUE pairs"):
            apply_amp_fallback(bad)


def test_shipped_fallback_recipes_are_lighter_float32_runs():
    """Every shipped config with SOLVER.AMP.FALLBACK_OPTS merges them on an AVX2 CPU (valid
    keys and values) into a lighter run: a shorter schedule, with its warm-up and checkpoints
    inside it, or a narrower FPN and smaller training images."""
    from detection.engine.train_net import apply_amp_fallback
    from segmentation.config import load_config as load_any_config

    data = Path(__file__).resolve().parents[1] / "backbones" / "data"
    avx2 = parse_cpuinfo((data / "cpuinfo_amd_epyc_zen3_avx2.txt").read_text())
    configs = Path(__file__).resolve().parents[2] / "configs"
    found = []
    for path in sorted(configs.rglob("*.yaml")):
        if "FALLBACK_OPTS" not in path.read_text():
            continue
        cfg = load_any_config(path)
        before = cfg.clone()
        with simulate_cpu(avx2):
            assert apply_amp_fallback(cfg), path.name
        assert cfg.SOLVER.WARMUP_ITERS < cfg.SOLVER.MAX_ITER <= before.SOLVER.MAX_ITER
        assert cfg.SOLVER.CHECKPOINT_PERIOD <= cfg.SOLVER.MAX_ITER, path.name
        lighter = (cfg.MODEL.FPN.OUT_CHANNELS < before.MODEL.FPN.OUT_CHANNELS
                   and max(cfg.INPUT.MIN_SIZE_TRAIN) < max(before.INPUT.MIN_SIZE_TRAIN))
        assert cfg.SOLVER.MAX_ITER < before.SOLVER.MAX_ITER or lighter, path.name
        found.append(path.name)
    assert {"cascade_rcnn_r18_fpn_shapes.yaml", "fcos_r18_fpn_shapes.yaml",
            "faster_rcnn_r18_fpn_shapes.yaml"} <= set(found)


def test_a_checkpoint_of_the_float32_recipe_loads_under_its_config(tmp_path, caplog):
    """A checkpoint trained with the config's SOLVER.AMP.FALLBACK_OPTS (a 64-wide FPN for the
    shapes default) is built as it was trained when its config is given again, on any CPU,
    also when its training run changed one of the recipe's training keys: --eval-only, the
    inference tools and load_model all merge the recipe (logged); a checkpoint trained
    without it keeps the config's own model."""
    from detection.config import resolve_config_path
    from detection.deploy.loading import load_for_evaluation
    from detection.engine.loading import apply_checkpoint_fallback, inference_config
    from detection.modeling.predictor import load_model

    name = "faster_rcnn_r18_fpn_shapes.yaml"
    weights = {}
    for recipe in ("float32", "bf16"):
        cfg = load_config(name)
        if recipe == "float32":
            cfg.defrost()
            cfg.merge_from_list(list(cfg.SOLVER.AMP.FALLBACK_OPTS))
            cfg.SOLVER.AMP.FALLBACK_OPTS = []
            cfg.INPUT.MIN_SIZE_TRAIN = (120,)  # also given on the training command line
        torch.manual_seed(0)
        model = build_model_from_cfg(cfg)
        weights[recipe] = str(tmp_path / f"{recipe}.pth")
        torch.save({"model": model.state_dict(), "config": cfg.dump()}, weights[recipe])
    plain = load_config(name)
    for recipe, width in (("float32", 64), ("bf16", 128)):
        with caplog.at_level("INFO", logger="detection.train"):
            cfg = inference_config(name, weights[recipe])
        assert cfg.MODEL.FPN.OUT_CHANNELS == width
        # the recipe's test size and RPN levels come with it
        lighter = recipe == "float32"
        assert (cfg.INPUT.MIN_SIZE_TEST < plain.INPUT.MIN_SIZE_TEST) == lighter
        assert (len(cfg.MODEL.RPN.IN_FEATURES) < len(plain.MODEL.RPN.IN_FEATURES)) == lighter
        assert ("float32 recipe" in caplog.text) == (recipe == "float32")
        caplog.clear()
        model = load_model(resolve_config_path(name), weights[recipe])
        assert model.backbone.output_shape()["p2"].channels == width
        cfg = load_config(name, ["MODEL.WEIGHTS", weights[recipe], "DATASETS.TEST", "()"])
        model = load_for_evaluation(cfg)
        assert cfg.MODEL.FPN.OUT_CHANNELS == width
        assert next(model.parameters()).shape  # built and loaded
    assert not apply_checkpoint_fallback(plain, str(tmp_path / "missing.pth"))
    assert plain.MODEL.FPN.OUT_CHANNELS == 128


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_fused_optimizer_takes_the_same_steps(optimizer):
    """SOLVER.FUSED_OPTIMIZER: torch's fused kernel, with the norm layers' own weight decay
    group, gives the steps of the default implementation up to float rounding."""
    steps = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 36, 5))
        cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", [
            "SOLVER.OPTIMIZER", optimizer, "SOLVER.FUSED_OPTIMIZER", str(fused),
            "SOLVER.WEIGHT_DECAY", "0.01", "SOLVER.BASE_LR", "0.01"])
        start = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(cfg, model)
        assert bool(opt.defaults.get("fused")) is fused
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
            opt.step()
        steps[fused] = [p.detach().clone() for p in model.parameters()]
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(steps[False], start))  # moved
    for a, b in zip(steps[False], steps[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _lr_curve(cfg, iters=100):
    """The lr of each of ``iters`` optimizer steps under the config's schedule."""
    opt = build_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(iters):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_multistep_and_cosine_schedules():
    cfg = load_config(None, ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(60, 80)",
                             "SOLVER.WARMUP_ITERS", "10", "SOLVER.BASE_LR", "0.1"])
    lrs = _lr_curve(cfg)
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[5] == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))  # linear from 0.001 to 1
    assert lrs[10] == pytest.approx(0.1) and lrs[59] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.01) and lrs[80] == pytest.approx(0.001)
    cfg.defrost()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    lrs = _lr_curve(cfg)
    assert lrs[50] == pytest.approx(0.05, rel=1e-6)  # half-way down the cosine
    assert lrs[99] < 0.001 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, opts, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from detection.engine import distributed as du

    du.init_distributed("gloo")
    cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", opts)
    model, results = train(cfg)
    # every replica's final weights, to compare; rank 0's evaluation covers both shards
    torch.save({"rank": rank, "results": results, "model": model.state_dict()},
               Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_gloo(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    opts = tiny_opts(tiny_data, out, **{"SOLVER.MAX_ITER": 3, "SOLVER.IMS_PER_BATCH": 4,
                                        "SOLVER.CHECKPOINT_PERIOD": 0})
    mp.start_processes(_ddp_worker, args=(2, _free_port(), opts, str(out)), nprocs=2,
                       start_method="spawn")
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    assert r1["results"] == {}  # only the main process reports
    final = load_checkpoint(out / "model_final.pth")
    changed = 0
    for k, v in final["model"].items():  # DDP keeps the replicas identical
        assert torch.equal(r0["model"][k], v) and torch.equal(r1["model"][k], v), k
    seed_all(0)  # the initialisation rank 0 trained from (DDP broadcasts it)
    init = build_model_from_cfg(load_config("faster_rcnn_r18_fpn_shapes.yaml", opts))
    for k, v in init.state_dict().items():
        changed += int(v.is_floating_point() and not torch.equal(v, final["model"][k]))
    assert changed > 50  # and they did train
    # evaluation gathered over 2 processes equals one process evaluating the same checkpoint
    cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", opts)
    attach_dataset_metadata(cfg)
    model = build_model_from_cfg(cfg)
    model.load_state_dict(final["model"])
    cfg.defrost()
    cfg.OUTPUT_DIR = str(tmp_path / "single")
    single = evaluate(cfg, model)
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert r0["results"]["bbox"][k] == pytest.approx(single["bbox"][k], nan_ok=True), k
    gathered = json.loads((out / "inference").glob("*/coco_instances_results.json")
                          .__next__().read_text())
    assert {d["image_id"] for d in gathered} <= set(range(1, 7))


def test_command_line_train_then_eval(tiny_data, tmp_path):
    out = tmp_path / "cli"
    opts = tiny_opts(tiny_data, out, **{"SOLVER.MAX_ITER": 2})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "tools" / "train_det.py"), "--config",
           "faster_rcnn_r18_fpn_shapes.yaml", *opts]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| bbox |" in res.stdout
    for name in ("config.yaml", "metrics.json", "model_final.pth", "loss.png", "log.txt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    res = subprocess.run(cmd + ["--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| bbox |" in res.stdout
    results = json.loads(next(out.glob("inference/*/coco_instances_results.json")).read_text())
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}
    # one checkpoint is enough for the demo (pictures) and the submission file
    val_json, val_images = tiny_data[1].split(":")
    res = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--weights",
                          str(out / "model_final.pth"), "--input", val_images, "--limit", "2",
                          "--output", str(tmp_path / "demo"), "--score-threshold", "0.0"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    pictures = sorted((tmp_path / "demo").glob("*.png"))
    assert len(pictures) == 2
    from detection.data.image_io import read_image

    drawn = np.asarray(Image.open(pictures[0]))
    original = read_image(Path(val_images) / (pictures[0].stem + ".jpg"))
    assert drawn.shape == original.shape and (drawn != original).any()  # boxes were drawn
    res = subprocess.run([sys.executable, str(REPO / "tools" / "submit_coco.py"), "--weights",
                          str(out / "model_final.pth"), "--image-info", val_json,
                          "--image-root", val_images, "--split", "val2017", "--alg", "tiny",
                          "--output", str(tmp_path / "sub")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "sub" / "detections_val2017_tiny_results.zip") as z:
        entries = json.loads(z.read("detections_val2017_tiny_results.json"))
    assert entries and {e["image_id"] for e in entries} <= set(range(1, 7))
    assert set(entries[0]) == {"image_id", "category_id", "bbox", "score"}
    # a misspelt key names the closest valid one
    res = subprocess.run(cmd + ["SOLVER.BASE_RL", "0.1"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode != 0 and "SOLVER.BASE_LR" in res.stderr


def test_visualize_data_draws_annotations_and_augmented_samples(tiny_data, tmp_path):
    train = tiny_data[0]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for source in ("annotation", "train"):
        out = tmp_path / source
        res = subprocess.run(
            [sys.executable, str(REPO / "tools" / "visualize_data.py"), "--config",
             "faster_rcnn_r18_fpn_shapes.yaml", "--dataset", train, "--source", source,
             "--num", "3", "--out", str(out), "INPUT.MIN_SIZE_TRAIN", "(160,)"],
            capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        pictures = sorted(out.glob("*.png"))
        assert len(pictures) == 3
        size = np.asarray(Image.open(pictures[0])).shape
        # annotations are drawn on the image as stored; augmented samples are resized
        assert (min(size[:2]) == 160) == (source == "train")


def test_resume_in_an_empty_folder_starts_from_model_weights(tiny_data, tmp_path, caplog):
    """``--resume`` where OUTPUT_DIR holds no checkpoint loads MODEL.WEIGHTS (as detectron2
    does) and says where it starts (a folder with a checkpoint: the resume tests above)."""
    first = tiny_cfg(tiny_data, tmp_path / "first", **{"DATASETS.TEST": "()",
                                                        "SOLVER.MAX_ITER": 2})
    train(first)
    weights = tmp_path / "first" / "model_final.pth"
    saved = load_checkpoint(weights)["model"]
    cfg = tiny_cfg(tiny_data, tmp_path / "empty", **{  # one step that changes no parameter
        "DATASETS.TEST": "()", "SOLVER.MAX_ITER": 1, "SOLVER.BASE_LR": 0.0,
        "SOLVER.WEIGHT_DECAY": 0.0, "MODEL.WEIGHTS": str(weights)})
    with caplog.at_level("INFO"):
        model, _ = train(cfg, resume=True)
    assert f"Starting at iteration 0 from MODEL.WEIGHTS {weights}" in caplog.text
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k].detach(), saved[k]) for k in params)
    fresh = dict(build_model_from_cfg(cfg).named_parameters())  # where it would have started
    assert any(not torch.equal(p.detach(), saved[k]) for k, p in fresh.items())


def test_datasets_root_is_where_class_metadata_is_read(tmp_path):
    """``DATASETS.ROOT`` holds for the class names that training and ``--eval-only`` read
    first, not only for the records (it used to be applied after the metadata was read)."""
    from detection.data.catalog import set_datasets_root

    annotations = tmp_path / "data" / "coco" / "annotations"
    annotations.mkdir(parents=True)
    (annotations / "instances_train2017.json").write_text(json.dumps({
        "images": [], "annotations": [],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}))
    cfg = load_config("faster_rcnn_r50_fpn.yaml", [
        "DATASETS.ROOT", str(tmp_path / "data"), "MODEL.ROI_HEADS.NUM_CLASSES", "2"])
    try:
        attach_dataset_metadata(cfg)
    finally:
        set_datasets_root(None)
    assert list(cfg.MODEL.CLASS_NAMES) == ["cat", "dog"]
    assert list(cfg.MODEL.CATEGORY_IDS) == [3, 7]


def test_eval_only_reads_class_names_from_the_checkpoint_or_the_test_set(tiny_data, tmp_path,
                                                                          caplog):
    """``--eval-only`` never opens the training json (COCO's is 448 MB): here it does not
    exist. Our checkpoint's stored config names the classes; a bare state dict leaves them to
    the test dataset."""
    import runpy


    cfg = tiny_cfg(tiny_data, tmp_path / "run", **{"DATASETS.TEST": "()", "SOLVER.MAX_ITER": 2})
    train(cfg)
    weights = tmp_path / "run" / "model_final.pth"
    bare = tmp_path / "bare.pth"
    torch.save({"model": load_checkpoint(weights)["model"]}, bare)
    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools" / "train_det.py"),
                          run_name="train_det")["main"]
    missing = f"{tmp_path / 'no_such_train.json'}:{tmp_path}"
    for w, source in ((weights, f"the checkpoint {weights}"),
                      (bare, f"the test dataset {tiny_data[1]}")):
        caplog.clear()
        args = ["--config", "faster_rcnn_r18_fpn_shapes.yaml", "--eval-only",
                *tiny_opts(tiny_data, tmp_path / "eval", **{
                    "DATASETS.TRAIN": f"('{missing}',)", "MODEL.WEIGHTS": str(w),
                    "TEST.RETAIN_FREED_MEMORY": False})]
        with caplog.at_level("INFO"):
            assert main(args) == 0
        assert f"Class names for evaluation from {source}" in caplog.text


def test_max_to_keep_keeps_the_newest_periodic_checkpoints(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, tmp_path / "run", **{
        "DATASETS.TEST": "()", "SOLVER.MAX_ITER": 5, "SOLVER.CHECKPOINT_PERIOD": 1,
        "SOLVER.MAX_TO_KEEP": 2})
    train(cfg)
    names = sorted(p.name for p in (tmp_path / "run").glob("model_*.pth"))
    assert names == ["model_0000003.pth", "model_0000004.pth", "model_final.pth"], names
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_final.pth"


def test_import_flag_registers_a_backbone_that_yaml_names(tiny_data, tmp_path, monkeypatch):
    """``tools/train_det.py --import MODULE``: a module of the user's (written here into a
    folder of its own) registers a backbone, the config names it, two iterations train, and
    the checkpoint records the module so that loading it imports the module again."""
    import runpy
    import sys

    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "my_backbones.py").write_text(
        "import backbones\n\n"
        "CALLS = []\n\n"
        "@backbones.register_backbone\n"
        "def my_tiny_resnet(**options):\n"
        "    CALLS.append(options)\n"
        "    return backbones.resnet18(**options)\n")
    monkeypatch.chdir(tmp_path / "user")
    monkeypatch.delitem(sys.modules, "my_backbones", raising=False)
    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools" / "train_det.py"),
                          run_name="train_det")["main"]
    out = tmp_path / "run"
    args = ["--config", "faster_rcnn_r18_fpn_shapes.yaml", "--import", "my_backbones",
            *tiny_opts(tiny_data, out, **{
                "DATASETS.TEST": "()", "SOLVER.MAX_ITER": 2, "MODEL.BACKBONE.NAME":
                "my_tiny_resnet", "MODEL.BACKBONE.NECK": "fpn", "MODEL.FPN.IN_FEATURES": "[]"})]
    assert main(args) == 0
    assert len(sys.modules["my_backbones"].CALLS) == 1  # the model was built from it
    state = load_checkpoint(out / "model_final.pth")
    assert state["iteration"] == 2
    from segmentation.config import load_config as load_full_config

    assert "my_backbones" in load_full_config(str(out / "config.yaml")).CUSTOM_IMPORTS
    with pytest.raises(ImportError, match="no module named 'not_a_module'"):
        main(["--config", "faster_rcnn_r18_fpn_shapes.yaml", "--import", "not_a_module"])


def test_a_training_start_parses_the_training_json_once(tmp_path, monkeypatch):
    """The class metadata and the records come from one parse of the training json."""
    import detection.data.coco as coco

    parsed = []
    real_load = coco.json.load

    def counting_load(f, *args, **kwargs):
        parsed.append(os.path.realpath(f.name))
        return real_load(f, *args, **kwargs)

    p = shapes.ensure_shapes_dataset(root=tmp_path / "data", num_train=6, num_val=2,
                                     image_size=(96, 128))  # a dataset no test has read
    data = (f"{p.train_json}:{p.train_images}", f"{p.val_json}:{p.val_images}")
    monkeypatch.setattr(coco.json, "load", counting_load)
    train(tiny_cfg(data, tmp_path / "run", **{"DATASETS.TEST": "()", "SOLVER.MAX_ITER": 1}))
    train_json = os.path.realpath(p.train_json)
    assert parsed.count(train_json) == 1, parsed


def test_import_flag_does_not_carry_into_the_next_parse():
    """Each parse gets its own list: a tool called twice in one process (tests, a notebook)
    does not record the first call's modules in the second run's CUSTOM_IMPORTS."""
    import argparse

    from detection.custom_imports import add_import_argument

    parser = argparse.ArgumentParser()
    add_import_argument(parser)
    assert parser.parse_args(["--import", "json"]).imports == ["json"]
    assert parser.parse_args([]).imports == []
