#!/usr/bin/env python
"""Run a script (``tools/train_det.py``) with one fault injected. Test-only: the library never
imports this file; it patches the library from outside, in the child process.

    DETKIT_FAULT=<kind>:<iteration>[:<rank>] python tests/detection/fault_inject.py \\
        tools/train_det.py --config ... OUTPUT_DIR ...

Kinds (``iteration`` counts from 1; ``rank`` defaults to every rank):

    kill-step     SIGKILL inside iteration N's optimizer step, after the weights in memory
                  changed and before the iteration is counted
    kill-write    SIGKILL halfway through writing the checkpoint of iteration N: the temporary
                  file holds half the bytes, fsynced
    kill-eval     SIGKILL on the second image of the evaluation that follows iteration N
                  (N = SOLVER.MAX_ITER: the final evaluation)
    term-step     SIGTERM to itself inside iteration N's optimizer step (a cluster preempting)
    raise-step    raise RuntimeError("injected fault ...") there
"""

import io
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from detection.engine.trainer import Trainer  # noqa: E402


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_step(iteration: int, action) -> None:
    """Run ``action()`` right after the optimizer step of ``iteration``."""
    run_step = Trainer.run_step

    def patched(self, batch):
        if self.iteration + 1 != iteration:
            return run_step(self, batch)
        opt = self.optimizer
        own = "step" in vars(opt)
        previous = opt.step

        def step(*args, **kwargs):
            out = previous(*args, **kwargs)
            action()
            return out

        opt.step = step
        try:
            return run_step(self, batch)
        finally:
            if own:
                opt.step = previous
            else:
                del opt.step

    Trainer.run_step = patched


def _patch_write(iteration: int) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == iteration and hasattr(f, "write"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _patch_eval(iteration: int) -> None:
    init = Trainer.__init__

    def patched(self, **kwargs):
        init(self, **kwargs)
        calls = [0]

        def hook(module, inputs, outputs):
            if not module.training and self.iteration == iteration:
                calls[0] += 1
                if calls[0] == 2:
                    _die()

        getattr(self.model, "module", self.model).register_forward_hook(hook)

    Trainer.__init__ = patched


def install(spec: str) -> None:
    kind, _, rest = spec.partition(":")
    iteration, _, rank = rest.partition(":")
    if rank:
        from detection.engine.distributed import launch_info

        if int(rank) != launch_info().rank:  # torchrun's RANK or SLURM's SLURM_PROCID
            return
    n = int(iteration)
    if kind == "kill-step":
        _patch_step(n, _die)
    elif kind == "term-step":
        _patch_step(n, lambda: os.kill(os.getpid(), signal.SIGTERM))
    elif kind == "raise-step":
        def boom():
            raise RuntimeError(f"injected fault at iteration {n}")
        _patch_step(n, boom)
    elif kind == "kill-write":
        _patch_write(n)
    elif kind == "kill-eval":
        _patch_eval(n)
    else:
        raise SystemExit(f"DETKIT_FAULT: unknown kind {kind!r}")


if __name__ == "__main__":
    if os.environ.get("DETKIT_FAULT"):
        install(os.environ["DETKIT_FAULT"])
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
