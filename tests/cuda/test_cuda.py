"""On a CUDA GPU: AMP float16 training with its GradScaler (the loss scale saved and resumed),
every family's forward against the same model on the CPU, the fused and Winograd modules
falling back to plain convolutions, and export from a CUDA model. Skipped without a GPU;
``python benchmarks/bench_gpu.py`` runs them with the GPU timings."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FAMILIES = ("faster_rcnn_r18_fpn_shapes.yaml", "mask_rcnn_r18_fpn_shapes.yaml",
            "retinanet_r18_fpn_shapes.yaml", "panoptic_fpn_r18_shapes.yaml",
            "semantic_fpn_r18_shapes.yaml")


def image(h: int = 160, w: int = 208, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, h, w, generator=g) * 60 + 80
    img[:, 40:100, 50:120] = torch.tensor([230.0, 40, 40])[:, None, None]
    return img.round()


def build(config: str, device: str):
    from detection.engine.loading import build_model_from_cfg
    from segmentation.config import load_config

    torch.manual_seed(0)
    return build_model_from_cfg(load_config(config, ["MODEL.DEVICE", device]))


@pytest.mark.parametrize("config", FAMILIES)
def test_every_family_runs_on_cuda_as_on_cpu(config):
    cpu = build(config, "cpu").eval()
    gpu = copy.deepcopy(cpu).to("cuda").eval()
    img = image()
    with torch.no_grad():
        want, got = cpu([img])[0], gpu([img.cuda()])[0]
    for key, value in want.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            assert got[key].device.type == "cuda", key
            if key in ("boxes", "scores", "sem_seg"):
                torch.testing.assert_close(got[key].cpu(), value, rtol=1e-3, atol=1e-2)


def test_amp_float16_training_saves_and_resumes_the_loss_scale(tmp_path):
    from detection.engine.checkpoint import Checkpointer, load_checkpoint
    from detection.engine.solver import build_lr_scheduler, build_optimizer
    from detection.engine.trainer import Trainer
    from segmentation.config import load_config

    cfg = load_config("faster_rcnn_r18_fpn_shapes.yaml", ["MODEL.DEVICE", "cuda"])
    batch = [{"image": image(seed=i).to(torch.uint8),
              "instances": {"boxes": torch.tensor([[50.0, 40, 120, 100]]),
                            "labels": torch.tensor([0])}} for i in range(2)]

    def trainer(out: Path, resume: bool):
        torch.manual_seed(0)
        model = build("faster_rcnn_r18_fpn_shapes.yaml", "cuda").train()
        opt = build_optimizer(cfg, model)
        sched = build_lr_scheduler(cfg, opt)
        ckpt = Checkpointer(out, model=model, optimizer=opt, scheduler=sched)
        t = Trainer(model=model, optimizer=opt, scheduler=sched,
                    data_loader=iter(lambda: batch, None), checkpointer=ckpt, max_iter=4,
                    checkpoint_period=2, progress=False, amp=True)
        t.start_iter = t.iteration = ckpt.resume() if resume else 0
        return t

    first = trainer(tmp_path, resume=False)
    assert first.amp_dtype == torch.float16 and first.scaler is not None
    first.run()
    saved = load_checkpoint(tmp_path / "model_final.pth")
    scale = saved["extra"]["grad_scaler"]["scale"]
    assert scale == first.scaler.get_scale() and scale > 0
    resumed = trainer(tmp_path, resume=True)
    assert resumed.scaler.get_scale() == scale


def test_fused_and_winograd_modules_fall_back_to_plain_convs_on_cuda():
    from backbones.fused import FusedConv2d, use_winograd

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).cuda()
    fused = FusedConv2d(conv, relu=True)
    assert use_winograd(torch.nn.Sequential(fused)) == 0  # a CPU path: not for CUDA weights
    x = torch.randn(1, 256, 40, 48, device="cuda")
    other = torch.randn(1, 256, 40, 48, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fused(x), F.relu(conv(x)))
        torch.testing.assert_close(fused(x, other), F.relu(conv(x) + other))


@pytest.mark.parametrize("config", FAMILIES[:3])
def test_optimize_for_inference_on_cuda_keeps_the_outputs(config):
    from detection.optimize import optimize_for_inference

    plain = build(config, "cuda").eval()
    fast = optimize_for_inference(copy.deepcopy(plain), precision="fp32")
    img = image().cuda()
    with torch.no_grad():
        want, got = plain([img])[0], fast([img])[0]
    torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-3, atol=1e-2)


def test_export_from_a_cuda_model(tmp_path):
    from detection.deploy import export_model, load_exported

    model = build("faster_rcnn_r18_fpn_shapes.yaml", "cuda").eval()
    export_model(model, tmp_path, "onnx")
    deployed = load_exported(tmp_path, "onnxruntime")
    img = image()
    with torch.no_grad():
        want = model([img.cuda()])[0]
    got = deployed([img])[0]
    assert got["boxes"].shape == want["boxes"].shape
    torch.testing.assert_close(got["boxes"], want["boxes"].cpu(), rtol=1e-3, atol=1e-2)
