"""The training loop: one short ``Trainer.run``, with checkpoints, evaluation and logging
called at fixed periods."""

import logging
import math
import time
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from . import distributed as du
from .checkpoint import Checkpointer
from .events import MetricsWriter

logger = logging.getLogger("detection.train")


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


class Trainer:
    """Runs iterations ``start_iter .. max_iter - 1`` of SGD/AdamW on a detector.

    A non-finite loss raises ``FloatingPointError`` naming the iteration and every loss,
    before the optimizer step and before any checkpoint, so the last checkpoint stays good.
    """

    def __init__(
        self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
        data_loader: Iterable, checkpointer: Optional[Checkpointer], max_iter: int,
        start_iter: int = 0, checkpoint_period: int = 0, eval_period: int = 0,
        evaluate_fn: Optional[Callable[[], Dict[str, float]]] = None,
        writer: Optional[MetricsWriter] = None, log_period: int = 20,
        clip_grad: Optional[Dict] = None, amp: bool = False, progress: bool = True,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data_loader, self.checkpointer = data_loader, checkpointer
        self.max_iter, self.start_iter = max_iter, start_iter
        self.checkpoint_period, self.eval_period = checkpoint_period, eval_period
        self.evaluate_fn, self.writer, self.log_period = evaluate_fn, writer, log_period
        self.clip_grad = clip_grad
        self.device = next(model.parameters()).device
        self.amp = amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.progress = progress and du.is_main_process()
        self.iteration = start_iter

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
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            losses = self.model(images, targets)
        total = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total_loss"] = float(total.detach())
        if du.any_rank(not math.isfinite(values["total_loss"]), self.device):
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
        from tqdm import tqdm

        self.model.train()
        logger.info("Training iterations %d..%d", self.start_iter, self.max_iter)
        data_iter = iter(self.data_loader)
        bar = tqdm(total=self.max_iter, initial=self.start_iter, disable=not self.progress,
                   dynamic_ncols=True, desc="train")
        window: List[Dict[str, float]] = []
        t_data = t_iter = 0.0
        try:
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
                if (self.checkpointer is not None and self.checkpoint_period
                        and it % self.checkpoint_period == 0 and it < self.max_iter):
                    du.broadcast_buffers(self.model)
                    if du.is_main_process():
                        self.checkpointer.save(f"model_{it:07d}", it)
                if self.evaluate_fn is not None and self.eval_period and (
                        it % self.eval_period == 0 and it < self.max_iter):
                    self._evaluate(it)
        finally:
            bar.close()
        du.broadcast_buffers(self.model)
        if self.checkpointer is not None and du.is_main_process():
            self.checkpointer.save("model_final", self.iteration)
        du.synchronize()

    def _evaluate(self, it: int) -> Dict[str, float]:
        du.broadcast_buffers(self.model)
        results = self.evaluate_fn()
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
