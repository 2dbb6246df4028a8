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
    kill-pointer  SIGKILL after the checkpoint of iteration N is renamed into place and before
                  ``last_checkpoint`` names it
    kill-eval     SIGKILL on the second image of the evaluation that follows iteration N
                  (N = SOLVER.MAX_ITER: the final evaluation)
    term-step     SIGTERM to itself inside iteration N's optimizer step (a cluster preempting)
    int-step      SIGINT to itself there (Ctrl-C)
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

from detection.engine import checkpoint as ckpt_module  # noqa: E402
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


def _patch_pointer(iteration: int) -> None:
    real = ckpt_module.atomic_write_text

    def write_text(path, text):
        if text.strip() in (f"model_{iteration:07d}.pth", "model_final.pth") and (
                Path(path).parent / text.strip()).is_file():
            state = ckpt_module.load_checkpoint(Path(path).parent / text.strip())
            if state["iteration"] == iteration:
                _die()
        return real(path, text)

    ckpt_module.atomic_write_text = write_text


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
    if rank and rank != os.environ.get("RANK", "0"):
        return
    n = int(iteration)
    signals = {"term-step": signal.SIGTERM, "int-step": signal.SIGINT}
    if kind == "kill-step":
        _patch_step(n, _die)
    elif kind in signals:
        _patch_step(n, lambda: os.kill(os.getpid(), signals[kind]))
    elif kind == "raise-step":
        def boom():
            raise RuntimeError(f"injected fault at iteration {n}")
        _patch_step(n, boom)
    elif kind == "kill-write":
        _patch_write(n)
    elif kind == "kill-pointer":
        _patch_pointer(n)
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
