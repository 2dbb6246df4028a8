"""Training steps of one config's recipes on this machine, timed round-robin in one process:
the config as it trains here (``SOLVER.AMP.FALLBACK_OPTS`` merged where mixed precision cannot
run, bf16 autocast where it can), the config without its float32 recipe (the same run where
bf16 is native), and any ``--compare`` configs. Each recipe trains on the first batches of its
loader, after two warm-up steps.

    python benchmarks/bench_train_step.py [--config faster_rcnn_r18_fpn_shapes.yaml]
        [--compare OTHER.yaml ...] [--steps 12] [--rounds 3] [--threads 0]

Prints the machine, then per recipe the seconds a step of each round, their mean and the ratio
to the first row. The shared 2-core machines change speed from hour to hour: compare ratios
of one run, not seconds across runs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import describe, load_config  # noqa: E402

from detection.data.build import build_train_loader  # noqa: E402
from detection.engine.loading import attach_dataset_metadata  # noqa: E402
from detection.engine.run_setup import seed_all  # noqa: E402
from detection.engine.solver import build_lr_scheduler, build_optimizer  # noqa: E402
from detection.engine.train_net import _clip_gradients, apply_amp_fallback  # noqa: E402
from detection.engine.trainer import Trainer  # noqa: E402
from detection.families import get_family  # noqa: E402


def recipe(name: str, opts: List[str], steps: int) -> Tuple[Trainer, List[Any]]:
    """A trainer for config ``name`` with ``opts``, warmed up, and the ``steps`` batches it
    will be timed on."""
    cfg = load_config(name, opts)
    apply_amp_fallback(cfg)
    family = get_family(cfg)
    attach_dataset_metadata(cfg)
    seed_all(cfg.SEED)  # as training seeds: the same model and batches
    model = family.build(cfg)
    optimizer = build_optimizer(cfg, model)
    loader = build_train_loader(cfg, mapper=family.build_mapper(cfg, True))
    trainer = Trainer(model=model, optimizer=optimizer,
                      scheduler=build_lr_scheduler(cfg, optimizer), data_loader=loader,
                      checkpointer=None, max_iter=int(cfg.SOLVER.MAX_ITER),
                      clip_grad=_clip_gradients(cfg), amp=bool(cfg.SOLVER.AMP.ENABLED),
                      progress=False)
    batches = iter(loader)
    timed = [next(batches) for _ in range(steps + 2)]
    model.train()
    for batch in timed[:2]:
        trainer.run_step(batch)
    return trainer, timed[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="faster_rcnn_r18_fpn_shapes.yaml")
    parser.add_argument("--compare", nargs="*", default=[], help="further configs to time")
    parser.add_argument("--steps", type=int, default=12, help="steps per recipe and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe())
    rows = {f"{args.config} as it trains here": (args.config, []),
            f"{args.config} without its float32 recipe": (
                args.config, ["SOLVER.AMP.FALLBACK_OPTS", "[]"])}
    rows.update({name: (name, []) for name in args.compare})
    trainers = {label: recipe(name, opts, args.steps) for label, (name, opts) in rows.items()}
    times = {label: [] for label in trainers}
    for _ in range(args.rounds):
        for label, (trainer, batches) in trainers.items():
            start = time.perf_counter()
            for batch in batches:
                trainer.run_step(batch)
            times[label].append((time.perf_counter() - start) / len(batches))
    first = statistics.mean(next(iter(times.values())))
    print(f"\n{'recipe':70s} {'s/step per round':24s} {'mean':>6s} {'ratio':>6s}")
    for label, values in times.items():
        mean = statistics.mean(values)
        rounds = " ".join(f"{v:.3f}" for v in values)
        print(f"{label:70s} {rounds:24s} {mean:6.3f} {mean / first:6.3f}")


if __name__ == "__main__":
    main()
