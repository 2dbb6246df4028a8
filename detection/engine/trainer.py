"""The training loop: one short ``Trainer.run``, with checkpoints, evaluation and logging
called at fixed periods.

Stopping without losing work:

- SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) let the current iteration finish, save
  ``model_{iteration:07d}.pth`` at that iteration, and exit with ``128 + signal`` (143, 130)
  by raising :class:`TrainingInterrupted`. Under DDP the ranks agree on the iteration to stop
  at (the flag rides on the all-reduce every step already does), so their saved states are
  consistent. A second Ctrl-C interrupts at once. Data-loader workers forked while training
  (Linux's default) inherit the handler and ignore both signals: the main process stops them.
- Evaluation runs between iterations and must not shift the training's random streams: the
  RNG states are put back after it (creating a test loader's iterator draws from torch's
  global generator), so a run resumed after that point repeats the uninterrupted run exactly.
- A collective that fails because another rank died raises ``PeerFailure`` naming that rank
  (see ``detection.engine.distributed``).
"""

import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from backbones.machine import BF16_FLAGS, bf16_runs_natively, describe

from . import distributed as du
from .checkpoint import Checkpointer, get_rng_state, set_rng_state
from .events import MetricsWriter

logger = logging.getLogger("detection.train")


class TrainingInterrupted(SystemExit):
    """Training stopped by a signal after saving a checkpoint; ``code`` is 128 + signal."""

    def __init__(self, signum: int, iteration: int, path: Optional[str]) -> None:
        super().__init__(128 + signum)
        self.signum, self.iteration, self.path = signum, iteration, path


class StopSignals:
    """SIGTERM and SIGINT set ``received`` instead of killing the process (main thread only).
    In a forked child (a data-loader worker) the handler ignores them."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.info("Training outside the main thread: SIGTERM/SIGINT keep their handlers")
            return
        self._pid = os.getpid()
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: the main process decides
            return
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        logger.warning("Received %s: stopping after the current iteration, with a checkpoint"
                       " (Ctrl-C again to stop at once)", signal.Signals(signum).name)


def batch_to_device(batch: List[dict], device: torch.device):
    """Mapper dicts -> (images, targets) as the model's training call takes them: detection
    targets from ``instances``, or ``{"sem_seg": label map}`` for semantic segmentation."""
    images = [d["image"].to(device, non_blocking=True) for d in batch]
    targets = []
    for d in batch:
        if "instances" not in d and "sem_seg" in d:  # semantic segmentation: the label map
            targets.append({"sem_seg": d["sem_seg"].to(device, non_blocking=True)})
            continue
        inst = d["instances"]
        targets.append({k: v.to(device, non_blocking=True) for k, v in inst.items()})
    return images, targets


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of mixed-precision training on ``device``: float16 on CUDA (with a
    GradScaler), bf16 on a CPU that computes it natively (no scaler: bf16 has float32's
    range); None where autocast would not pay (a CPU without bf16 units emulates it)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and bf16_runs_natively("cpu"):
        return torch.bfloat16
    return None


class Trainer:
    """Runs iterations ``start_iter .. max_iter - 1`` of SGD/AdamW on a detector.

    A non-finite loss raises ``FloatingPointError`` naming the iteration and every loss,
    before the optimizer step and before any checkpoint, so the last checkpoint stays good.
    ``amp``: autocast in float16 on CUDA, in bf16 on a CPU with native bf16 (``amp_dtype``).
    ``grad_scaler``: the AMP scaler to use (default: a CUDA one when ``amp`` and the model is
    on CUDA); its state is saved in checkpoints and restored on resume.
    """

    def __init__(
        self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
        data_loader: Iterable, checkpointer: Optional[Checkpointer], max_iter: int,
        start_iter: int = 0, checkpoint_period: int = 0, eval_period: int = 0,
        evaluate_fn: Optional[Callable[[], Dict[str, float]]] = None,
        writer: Optional[MetricsWriter] = None, log_period: int = 20,
        clip_grad: Optional[Dict] = None, amp: bool = False, progress: bool = True,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data_loader, self.checkpointer = data_loader, checkpointer
        self.max_iter, self.start_iter = max_iter, start_iter
        self.checkpoint_period, self.eval_period = checkpoint_period, eval_period
        self.evaluate_fn, self.writer, self.log_period = evaluate_fn, writer, log_period
        self.clip_grad = clip_grad
        self.device = next(model.parameters()).device
        self.amp_dtype = amp_dtype(self.device) if amp else None
        self.amp = self.amp_dtype is not None
        if amp and not self.amp:
            logger.warning("SOLVER.AMP.ENABLED is ignored on %s: autocast needs CUDA (float16) "
                           "or a CPU with native bf16 (one of %s; %s); training in float32",
                           self.device.type, ", ".join(BF16_FLAGS), describe())
        if amp and self.amp_dtype == torch.bfloat16:
            logger.info("SOLVER.AMP.ENABLED on CPU: convolutions and matrix products in bf16 "
                        "(torch.autocast), parameters, optimizer and losses in float32")
        if grad_scaler is None and self.amp_dtype == torch.float16:
            grad_scaler = torch.amp.GradScaler("cuda")
        self.scaler = grad_scaler
        if self.scaler is not None and checkpointer is not None:
            checkpointer.register("grad_scaler", self.scaler)
        if checkpointer is not None:
            checkpointer.register_model_states()
        self.progress = progress and du.is_main_process()
        self.iteration = start_iter
        self.signals = StopSignals()
        self._stop_agreed = False  # under DDP: some rank got a stop signal (agreed by all)
        self._saved_at: Optional[int] = None
        self._saved_path: Optional[str] = None

    def _clip(self) -> None:
        if not self.clip_grad:
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip_grad["type"] == "value":
            torch.nn.utils.clip_grad_value_(params, self.clip_grad["value"])
        else:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad["value"],
                                           norm_type=self.clip_grad.get("norm_type", 2.0))

    def run_step(self, batch: List[dict]) -> Dict[str, float]:
        images, targets = batch_to_device(batch, self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp
                    else nullcontext())
        with autocast:
            losses = self.model(images, targets)
        total = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total_loss"] = float(total.detach())
        nonfinite, self._stop_agreed = du.any_rank_flags(
            [not math.isfinite(values["total_loss"]), self.signals.received is not None],
            self.device)
        if nonfinite:
            raise FloatingPointError(
                f"loss is not finite at iteration {self.iteration + 1}: "
                + ", ".join(f"{k}={v:.6g}" for k, v in values.items())
                + " (no checkpoint was written for it; lower SOLVER.BASE_LR, enable "
                "SOLVER.CLIP_GRADIENTS, or check the data)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self._clip()
            self.optimizer.step()
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return values

    def run(self) -> None:
        """Train to ``max_iter`` and save ``model_final.pth``; see the module doc for what
        signals and failed ranks do."""
        from tqdm import tqdm

        self.model.train()
        starts = du.all_gather_object(self.start_iter)
        if len(set(starts)) > 1:
            raise RuntimeError(f"the ranks resumed at different iterations {starts} (in rank "
                               "order): every rank must read the same OUTPUT_DIR (a shared "
                               "file system) to resume")
        logger.info("Training iterations %d..%d", self.start_iter, self.max_iter)
        self.signals.install()  # before the loader's workers are forked
        bar = tqdm(total=self.max_iter, initial=self.start_iter, disable=not self.progress,
                   dynamic_ncols=True, desc="train")
        try:
            self._loop(bar)
            bar.close()
            self._save("model_final")
            # a signal during the final save: exit non-zero rather than start evaluating
            self._stop_if_signalled(du.any_rank(self.signals.received is not None))
            du.synchronize()
        except Exception as e:
            if du.get_world_size() > 1:  # name the rank to blame, and tell the others
                cause = du.explain_failure(e)
                err = du.PeerFailure(f"rank {du.get_rank()} stops after {self.iteration} "
                                     f"iterations: {cause}") if cause else e
                du.post_failure(err)
                if cause:
                    raise err from e
            raise
        finally:
            bar.close()
            self.signals.uninstall()

    def _loop(self, bar) -> None:
        data_iter = iter(self.data_loader)
        window: List[Dict[str, float]] = []
        t_data = t_iter = 0.0
        while self.iteration < self.max_iter:
            t0 = time.perf_counter()
            batch = next(data_iter)
            t1 = time.perf_counter()
            values = self.run_step(batch)
            self.iteration += 1
            t_data += t1 - t0
            t_iter += time.perf_counter() - t0
            window.append(values)
            bar.update(1)
            bar.set_postfix(loss=f"{values['total_loss']:.3f}", refresh=False)
            it = self.iteration
            if it % self.log_period == 0 or it == self.max_iter:
                means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                means = du.reduce_mean(means)
                means["time"] = t_iter / len(window)
                means["data_time"] = t_data / len(window)
                window, t_data, t_iter = [], 0.0, 0.0
                if self.writer is not None and du.is_main_process():
                    self.writer.write(it, means)
                    self.writer.log(it, means)
            if (self.checkpoint_period and it % self.checkpoint_period == 0
                    and it < self.max_iter):
                self._save(f"model_{it:07d}")
            if self.evaluate_fn is not None and self.eval_period and (
                    it % self.eval_period == 0 and it < self.max_iter):
                self._evaluate(it)
            agreed = self._stop_agreed if du.get_world_size() > 1 else (
                self.signals.received is not None)
            if it < self.max_iter:
                self._stop_if_signalled(agreed)

    def _save(self, name: str) -> Optional[str]:
        """Save on the main process, with every rank's RNG states (a collective)."""
        if self.checkpointer is None:
            return None
        du.broadcast_buffers(self.model)
        rng_states = du.all_gather_object(get_rng_state())
        path = None
        if du.is_main_process():
            path = str(self.checkpointer.save(name, self.iteration, rng_states=rng_states))
        self._saved_at, self._saved_path = self.iteration, path
        return path

    def _stop_if_signalled(self, agreed: bool) -> None:
        if not agreed:
            return
        signum = self.signals.received or signal.SIGTERM  # another rank got it
        path = self._saved_path if self._saved_at == self.iteration else None
        if self.checkpointer is not None:
            if self._saved_at != self.iteration:
                path = self._save(f"model_{self.iteration:07d}")
            du.synchronize()  # nobody exits while rank 0 writes
        logger.warning("Stopped by %s at iteration %d%s; continue with --resume",
                       signal.Signals(signum).name, self.iteration,
                       f", checkpoint {path}" if path else "")
        raise TrainingInterrupted(signum, self.iteration, path)

    def _evaluate(self, it: int) -> Dict[str, float]:
        du.broadcast_buffers(self.model)
        rng = get_rng_state()  # evaluation must not shift the training's random streams
        try:
            results = self.evaluate_fn()
        finally:
            set_rng_state(rng)
        self.model.train()
        flat = flatten_results(results)
        if self.writer is not None and du.is_main_process() and flat:
            self.writer.write(it, flat)
        return results


def flatten_results(results: Dict) -> Dict[str, float]:
    """{"bbox": {"AP": 40.1, ...}} -> {"bbox/AP": 40.1, ...}, skipping per-category entries."""
    flat = {}
    for task, metrics in (results or {}).items():
        if isinstance(metrics, dict):
            for k, v in metrics.items():
                if not k.startswith(("AP-", "IoU-", "ACC-")):
                    flat[f"{task}/{k}"] = float(v)
    return flat
