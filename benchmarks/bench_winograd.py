"""One 3x3 conv with ReLU, float32, channels-last: oneDNN's direct convolution (the fused
post-op path the inference models use) against ours as Winograd F(4x4, 3x3) and F(6x6, 3x3),
in one process.

    python benchmarks/bench_winograd.py [--runs 8] [--threads 2] [--chunks 128,256,544,1088]

For each shape (the FPN levels of an 800x1088 input at 256 channels, res5 at 512, the mask
head's 100 RoIs of 14x14, res3 at 128 channels) prints oneDNN's best time, the ratio of
F(4x4)'s best time to it for each chunk size and F(6x6)'s at its default chunk (calls
interleaved, so that a change in the machine's load touches all), and the largest error of
each against a float64 convolution.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import machine  # noqa: E402
from backbones.winograd import transform_weight, winograd_conv3x3  # noqa: E402

SHAPES = [(1, 256, 200, 272), (1, 256, 100, 136), (1, 256, 50, 68), (1, 256, 25, 34),
          (1, 256, 13, 17), (1, 512, 25, 34), (100, 256, 14, 14), (1, 128, 100, 136)]


def time_shape(shape, chunks, runs, gen):
    """Best seconds and float64-referenced max error of oneDNN's direct conv ("direct")
    and of F(4x4) at each chunk size and F(6x6) ("F(6x6)"), calls interleaved."""
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, c, 3, 3, generator=gen) * (2 / (9 * c)) ** 0.5).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(c, generator=gen) * 0.1
    weight_t = transform_weight(weight)
    weight_t6 = transform_weight(weight, 6)
    op = torch.ops.mkldnn._convolution_pointwise
    fns = {"direct": lambda: op(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")}
    for chunk in chunks:
        fns[chunk] = (lambda k=chunk: winograd_conv3x3(x, weight_t, bias, relu=True,
                                                       chunk_tiles=k))
    fns["F(6x6)"] = lambda: winograd_conv3x3(x, weight_t6, bias, relu=True)
    times = {k: [] for k in fns}
    with torch.no_grad():
        ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), padding=1))
        err = {k: (f().double() - ref).abs().max().item() for k, f in fns.items()}
        for _ in range(runs):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}, err


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--chunks", default="128,256,544,1088")
    args = parser.parse_args()
    print(machine.describe(), flush=True)  # the machine heads every table
    if args.threads:
        torch.set_num_threads(args.threads)
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"{torch.get_num_threads()} threads, best of {args.runs}; ratio = Winograd / direct")
    gen = torch.Generator().manual_seed(0)
    for n, c, h, w in SHAPES:
        best, err = time_shape((n, c, h, w), chunks, args.runs, gen)
        direct = best["direct"]
        ratios = "  ".join(f"{k}: {best[k] / direct:.2f}" for k in [*chunks, "F(6x6)"])
        print(f"{n:>3} x {c:>3} x {h:>3} x {w:>3}  direct {direct * 1e3:7.1f} ms  {ratios}  "
              f"max error direct {err['direct']:.1e}, F(4x4) {err[chunks[0]]:.1e}, "
              f"F(6x6) {err['F(6x6)']:.1e}")


if __name__ == "__main__":
    main()
