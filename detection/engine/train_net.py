"""The train entry, top to bottom: what ``tools/train_det.py`` runs.

    metadata -> saved config -> seed -> model (its family) -> weights -> optimizer, schedule
    -> checkpointer (resume) -> DDP -> loader (the family's mapper) -> Trainer.run (periodic
    checkpoints and evaluation) -> final evaluation -> metrics and curves
"""

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from backbones.machine import describe
from detection.families import get_family

from . import distributed as du
from .checkpoint import Checkpointer
from .evaluation import evaluate
from .events import MetricsWriter, plot_curves
from .loading import attach_dataset_metadata, load_weights, merge_fallback_opts
from .run_setup import seed_all
from .solver import build_lr_scheduler, build_optimizer
from .trainer import Trainer, amp_dtype, flatten_results

__all__ = ["apply_amp_fallback", "train"]

logger = logging.getLogger("detection.train")


def _clip_gradients(cfg: Any) -> Optional[Dict[str, Any]]:
    c = cfg.SOLVER.CLIP_GRADIENTS
    if not c.ENABLED:
        return None
    return {"type": c.CLIP_TYPE, "value": c.CLIP_VALUE, "norm_type": c.NORM_TYPE}


def apply_amp_fallback(cfg: Any) -> bool:
    """Merge ``SOLVER.AMP.FALLBACK_OPTS`` into ``cfg`` (and log them) when the config asks
    for AMP and this machine cannot run it (``amp_dtype``); True when merged."""
    opts = list(cfg.SOLVER.AMP.FALLBACK_OPTS)
    if not cfg.SOLVER.AMP.ENABLED or not opts or amp_dtype(torch.device(cfg.MODEL.DEVICE)):
        return False
    if len(opts) % 2:
        raise ValueError(f"SOLVER.AMP.FALLBACK_OPTS must be KEY VALUE pairs, got {opts}")
    merge_fallback_opts(cfg)
    logger.info("No mixed precision on this machine (%s): the config's float32 recipe "
                "applies, SOLVER.AMP.FALLBACK_OPTS %s", describe(),
                " ".join(f"{k}={v}" for k, v in zip(opts[::2], opts[1::2])))
    return True


def train(cfg: Any, *, resume: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train the model ``cfg`` describes, evaluating periodically and at the end.
    Returns the trained model and the final evaluation results ({} off the main process)."""
    from detection.config import save_config
    from detection.data.build import build_train_loader

    apply_amp_fallback(cfg)
    family = get_family(cfg)
    output_dir = Path(cfg.OUTPUT_DIR)
    if cfg.CUSTOM_IMPORTS:  # imported when the config was read; named in the log
        logger.info("Modules imported for this run (CUSTOM_IMPORTS): %s",
                    ", ".join(cfg.CUSTOM_IMPORTS))
    attach_dataset_metadata(cfg)  # class names into the config, so checkpoints carry them
    if du.is_main_process():
        save_config(cfg, output_dir)
    seed_all(cfg.SEED)
    model = family.build(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = Checkpointer(
        output_dir, model=model, optimizer=optimizer, scheduler=scheduler,
        config_yaml=cfg.dump(), metadata=model.metadata.to_dict(),
        keep_last=int(cfg.SOLVER.MAX_TO_KEEP),
    )
    # --resume continues from OUTPUT_DIR's newest checkpoint; without one (or without
    # --resume) training starts at iteration 0 from MODEL.WEIGHTS, as detectron2's does
    start_iter = checkpointer.resume() if resume else 0
    if checkpointer.resumed_from is None:
        if cfg.MODEL.WEIGHTS:
            load_weights(model, cfg.MODEL.WEIGHTS, cfg)
        logger.info("Starting at iteration 0 from %s", f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}"
                    if cfg.MODEL.WEIGHTS else "the initialization (MODEL.WEIGHTS is empty)")
    train_model = model
    if du.get_world_size() > 1:
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    max_iter = int(cfg.SOLVER.MAX_ITER)
    writer = MetricsWriter(output_dir, max_iter=max_iter, start_iter=start_iter) \
        if du.is_main_process() else None
    loader = build_train_loader(cfg, start_iter=start_iter, mapper=family.build_mapper(cfg, True))
    trainer = Trainer(
        model=train_model, optimizer=optimizer, scheduler=scheduler, data_loader=loader,
        checkpointer=checkpointer, max_iter=max_iter, start_iter=start_iter,
        checkpoint_period=int(cfg.SOLVER.CHECKPOINT_PERIOD),
        eval_period=int(cfg.TEST.EVAL_PERIOD), evaluate_fn=lambda: evaluate(cfg, model),
        writer=writer, log_period=int(cfg.SOLVER.LOG_PERIOD), clip_grad=_clip_gradients(cfg),
        amp=bool(cfg.SOLVER.AMP.ENABLED),
    )
    t0 = time.perf_counter()
    trainer.run()
    train_time = time.perf_counter() - t0
    logger.info("Training took %.1f s", train_time)
    results = evaluate(cfg, model) if cfg.DATASETS.TEST else {}
    if writer is not None:
        flat = flatten_results(results if len(cfg.DATASETS.TEST) == 1 else {})
        flat["train_time"] = train_time
        writer.write(max_iter, flat)
        writer.close()
        plot_curves(output_dir)
    return model, results
