"""The GPU check, in one command (under 10 minutes on one GPU):

    python benchmarks/bench_gpu.py [--iters 200] [--skip-tests]

On a CUDA machine it
1. runs the tests marked ``cuda`` (tests/cuda: AMP float16 with the GradScaler, every family
   on CUDA against the CPU, the fused/Winograd fall-backs, export from a CUDA model);
2. trains ``--iters`` iterations of the R50-FPN Faster R-CNN in AMP float16 on synthetic
   COCO-sized images (2 per iteration, 800x1067): torchvision's ``fasterrcnn_resnet50_fpn``
   (random weights, FrozenBN, 3 trainable stages) and ours holding the same weights
   (``configs/torchvision/fasterrcnn_resnet50_fpn.yaml``, the architecture of
   ``faster_rcnn_r50_fpn.yaml`` with torchvision's conventions), and prints s/iter for both;
3. times inference per image, ours against torchvision's, in float32 and float16 autocast;
4. where two GPUs exist, trains the shapes default for 20 iterations under torchrun with DDP
   over NCCL.
It prints one table and exits non-zero if any part fails (2 where there is no GPU).
"""

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import converted, freeze_like_pretrained  # noqa: E402

from backbones.machine import describe  # noqa: E402
from detection.modeling.convert import torchvision_to_ours  # noqa: E402
from detection.optimize import optimize_for_inference  # noqa: E402


def synthetic_batch(n: int, seed: int):
    """``n`` COCO-sized images (0-255, 800x1067) with 1-10 boxes each."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append((torch.rand(3, 800, 1067, generator=g) * 255).round())
        k = int(torch.randint(1, 11, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([900.0, 650.0])
        wh = torch.rand(k, 2, generator=g) * 150 + 16
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, 80, (k,), generator=g)})
    return images, targets


def cuda_time(fn, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` calls after 3 warm-up calls (synchronized)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def r50_fpn_pair():
    """(torchvision's model, ours with its weights), both on the GPU."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    ref = freeze_like_pretrained(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
    ours = converted(ref, "torchvision/fasterrcnn_resnet50_fpn.yaml", torchvision_to_ours)
    return ref.cuda(), ours.cuda()


def train_step_time(model, images, targets, iters: int, *, zero_one: bool) -> float:
    """s/iter of AMP float16 training with a GradScaler (SGD, lr 0.01); ``zero_one``: the
    model takes 0-1 images and labels with background at 0 (torchvision's)."""
    imgs = [(i / 255 if zero_one else i).cuda() for i in images]
    tgts = [{"boxes": t["boxes"].cuda(), "labels": (t["labels"] + int(zero_one)).cuda()}
            for t in targets]  # ours: contiguous 0..89 for torchvision's 1..90
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                          momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(model(imgs, tgts).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return cuda_time(step, iters)


def inference_time(model, image, iters: int, *, zero_one: bool, fp16: bool) -> float:
    x = (image / 255 if zero_one else image).cuda()
    model.eval()

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16,
                                                    enabled=fp16):
            model([x])

    return cuda_time(run, iters)


def run_cuda_tests() -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/cuda"],
                          cwd=ROOT, capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
        raise RuntimeError(f"cuda tests failed: {tail}")
    return tail


def run_ddp() -> str:
    out = tempfile.mkdtemp(prefix="bench_gpu_ddp_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "tools/train_det.py", "--config", "faster_rcnn_r18_fpn_shapes.yaml",
           "MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "10",
           "SOLVER.AMP.ENABLED", "True", "DATASETS.TEST", "()", "OUTPUT_DIR", out]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0 or not Path(out, "model_final.pth").is_file():
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise RuntimeError("2-process DDP over NCCL failed")
    return f"20 iterations on 2 GPUs in {time.perf_counter() - t0:.0f} s, checkpoint written"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200, help="training iterations timed")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the cuda tests")
    args = parser.parse_args()
    print(describe("cuda"), flush=True)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check")
        return 2
    rows, failed = [], False

    def part(name, fn):
        nonlocal failed
        try:
            rows.append((name, fn()))
        except Exception as e:  # report every part, then fail
            failed = True
            rows.append((name, f"FAILED: {type(e).__name__}: {e}"))
        print(f"{rows[-1][0]}: {rows[-1][1]}", flush=True)

    if not args.skip_tests:
        part("tests marked cuda", run_cuda_tests)
    images, targets = synthetic_batch(2, seed=0)
    ref, ours = r50_fpn_pair()
    ref_eval, fast = copy.deepcopy(ref).eval(), copy.deepcopy(ours).eval()  # before training
    optimize_for_inference(fast, precision="fp32")
    times = {}

    def train(name, model, zero_one):
        times[name] = train_step_time(model, images, targets, args.iters, zero_one=zero_one)
        return f"{times[name]:.4f} s/iter"

    part("train R50-FPN AMP fp16, torchvision", lambda: train("tv", ref, True))
    part("train R50-FPN AMP fp16, ours", lambda: train("ours", ours, False))
    if "tv" in times and "ours" in times:
        rows.append(("train ratio ours / torchvision", f"{times['ours'] / times['tv']:.3f}"))
    for fp16 in (False, True):
        label = "fp16 autocast" if fp16 else "fp32"
        t_ref = inference_time(ref_eval, images[0], 20, zero_one=True, fp16=fp16)
        t_ours = inference_time(fast, images[0], 20, zero_one=False, fp16=fp16)
        rows.append((f"inference 800x1067 {label}, torchvision", f"{t_ref * 1000:.1f} ms"))
        rows.append((f"inference 800x1067 {label}, ours",
                     f"{t_ours * 1000:.1f} ms (ratio {t_ours / t_ref:.3f})"))
    if torch.cuda.device_count() >= 2:
        part("DDP, 2 processes, NCCL", run_ddp)
    else:
        rows.append(("DDP, 2 processes, NCCL", "skipped: one GPU"))
    print(f"\n| check ({torch.cuda.get_device_name(0)}, torch {torch.__version__}) | result |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
