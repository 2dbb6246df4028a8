"""RetinaNet R50-FPN inference: ours against torchvision's ``retinanet_resnet50_fpn``, same
weights (random, with calibrated BatchNorm statistics and a lively classification head, so
that hundreds of scores pass 0.05), same process, one 800x1067 image, timed round-robin.

    python benchmarks/bench_retinanet.py [--runs 5] [--threads 2] [--retain-freed-memory]

Prints median seconds, the ratio ours / torchvision, and the share of torchvision's
detections that ours reproduces (same label, IoU > 0.99, score within 1e-3), for our plain
model, for the inference-optimized one (BatchNorm folded, channels_last, fused ReLUs,
Winograd 3x3 convs), the same without Winograd ("opt. direct"), and bf16 (backbone in bf16,
head in float32; its agreement is not expected of random weights). ``--retain-freed-memory``
times with ``backbones.cpu_memory.retain_freed_memory()`` in effect (the process's heap, so
torchvision's model too), as the inference tools run.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import converted, median_times, timing_args  # noqa: E402
from torchvision.models.detection import retinanet_resnet50_fpn  # noqa: E402

from backbones.cpu_memory import retain_freed_memory  # noqa: E402
from detection.deploy.agreement import compare_detections  # noqa: E402
from detection.modeling.calibration import calibrate_batchnorm, textured_image  # noqa: E402
from detection.modeling.retinanet_convert import to_ours  # noqa: E402
from detection.optimize import optimize_for_inference  # noqa: E402


@torch.no_grad()
def lively_reference(img: torch.Tensor) -> torch.nn.Module:
    """torchvision's random RetinaNet with variance-preserving head convs, class logits of
    spread 0.8 around the prior's bias (its background logit silenced, as training leaves it)
    and BatchNorm statistics calibrated on ``img``."""
    torch.manual_seed(0)
    ref = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    head = ref.head
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=(2 / (m.in_channels * 9)) ** 0.5)
    torch.nn.init.normal_(head.regression_head.bbox_reg.weight, std=0.003)
    calibrate_batchnorm(ref, lambda: ref([img / 255]))
    cls = head.classification_head.cls_logits
    seen = []
    hook = cls.register_forward_hook(lambda m, i, out: seen.append(out - m.bias[:, None, None]))
    ref([img / 255])
    hook.remove()
    cls.weight.mul_(0.8 / torch.cat([x.flatten() for x in seen]).std())
    cls.bias.view(head.regression_head.bbox_reg.out_channels // 4, -1)[:, 0] = -30.0
    return ref


def ours_from(ref: torch.nn.Module) -> torch.nn.Module:
    return converted(ref, "torchvision/retinanet_resnet50_fpn.yaml", to_ours)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--retain-freed-memory", action="store_true")
    args = timing_args(parser)
    if args.retain_freed_memory and not retain_freed_memory():
        print("retain_freed_memory() has no effect here (not glibc)")
    img = textured_image(800, 1067, generator=torch.Generator().manual_seed(0))
    ref = lively_reference(img)
    plain = ours_from(ref)
    fast = optimize_for_inference(ours_from(ref), channels_last=True)
    direct = optimize_for_inference(ours_from(ref), channels_last=True, winograd=False)
    bf16 = optimize_for_inference(ours_from(ref), precision="bf16")
    with torch.inference_mode():
        expected = ref([img / 255])[0]
        rows = {"ours, plain": plain, "ours, optimized": fast,
                "ours, opt. direct": direct, "ours, bf16": bf16}
        got = {name: m([img])[0] for name, m in rows.items()}
        fns = {"torchvision": lambda: ref([img / 255])}
        fns.update({name: (lambda m=m: m([img])) for name, m in rows.items()})
        times = median_times(fns, args.runs)
        t_ref = times.pop("torchvision")
    heap = "freed memory retained" if args.retain_freed_memory else "glibc malloc as it comes"
    print(f"RetinaNet R50-FPN inference, 800x1067, {torch.get_num_threads()} threads, median of "
          f"{args.runs}, {heap}; torchvision returns {expected['boxes'].shape[0]} detections")
    print(f"  torchvision       {t_ref:.3f} s   ratio 1.000")
    for name, t in times.items():
        agreement = compare_detections(expected, got[name], label_offset=1)
        print(f"  {name:<17} {t:.3f} s   ratio {t / t_ref:.3f}   {agreement}")


if __name__ == "__main__":
    main()
