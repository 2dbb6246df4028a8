"""What ``tools/train_det.py`` and ``tools/eval_det.py`` do: set up a run from a config,
train with periodic checkpoints and evaluation, evaluate a model on the test datasets."""

import logging
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import distributed as du
from .checkpoint import Checkpointer, load_checkpoint
from .events import MetricsWriter, plot_curves
from .solver import build_lr_scheduler, build_optimizer
from .trainer import Trainer, flatten_results

logger = logging.getLogger("detection.train")


@dataclass(frozen=True)
class MetaArchitecture:
    """How the runner builds, feeds and evaluates a model family registered from a package
    above detection (segmentation). Hooks left None fall back to the detector's."""

    build: Callable[[Any], nn.Module]  # cfg -> model
    build_mapper: Optional[Callable[[Any, bool], Any]] = None  # (cfg, is_train) -> mapper
    build_evaluator: Optional[Callable[[Any, str, Optional[Path]], Any]] = None
    attach_metadata: Optional[Callable[[Any], None]] = None  # cfg -> None (sets CLASS_NAMES)
    load_weights: Optional[Callable[[nn.Module, str], None]] = None  # (model, MODEL.WEIGHTS)


# MODEL.META_ARCHITECTURE (also the model's class name) -> MetaArchitecture
META_ARCHITECTURES: Dict[str, MetaArchitecture] = {}


def register_meta_architecture(name: str, build: Callable[[Any], nn.Module],
                               **hooks: Any) -> None:
    """Make ``MODEL.META_ARCHITECTURE: name`` build with ``build(cfg)``; ``hooks`` are the
    other fields of :class:`MetaArchitecture`."""
    META_ARCHITECTURES[name] = MetaArchitecture(build=build, **hooks)


def _meta_arch(cfg: Any) -> Optional[MetaArchitecture]:
    return META_ARCHITECTURES.get(cfg.MODEL.get("META_ARCHITECTURE", ""))


def _mapper(cfg: Any, is_train: bool) -> Any:
    arch = _meta_arch(cfg)
    return arch.build_mapper(cfg, is_train) if arch and arch.build_mapper else None


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not break a tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(output_dir: Optional[Path] = None) -> None:
    """INFO to the console and ``output_dir/log.txt`` on the main process; warnings elsewhere."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_detkit", False):
            root.removeHandler(h)
    level = logging.INFO if du.is_main_process() else logging.WARNING
    root.setLevel(level)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    console._detkit = True
    root.addHandler(console)
    if output_dir is not None and du.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(output_dir / "log.txt")
        fh.setFormatter(fmt)
        fh._detkit = True
        root.addHandler(fh)


def seed_all(seed: int) -> None:
    """Seed every RNG; each rank gets its own stream (seed + rank)."""
    s = int(seed) + du.get_rank()
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def attach_dataset_metadata(cfg: Any) -> None:
    """Copy the training dataset's class names and category ids into ``cfg.MODEL`` (so that
    checkpoints carry them) and check the class count."""
    from detection.data.catalog import get_metadata

    arch = _meta_arch(cfg)
    if arch is not None and arch.attach_metadata is not None:
        arch.attach_metadata(cfg)
        return
    if cfg.MODEL.CLASS_NAMES or not cfg.DATASETS.TRAIN:
        return
    meta = get_metadata(cfg.DATASETS.TRAIN[0])
    names = list(meta.get("thing_classes", []))
    if not names:
        return
    ids = [int(i) for i in meta.get("contiguous_id_to_dataset_id", range(len(names)))]
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(names):
        raise ValueError(
            f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
            f"{cfg.DATASETS.TRAIN[0]!r} has {len(names)} categories; set it to {len(names)}"
        )
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.CLASS_NAMES = names
    cfg.MODEL.CATEGORY_IDS = ids
    if was_frozen:
        cfg.freeze()


def load_weights(model: nn.Module, weights: str) -> None:
    """Load ``MODEL.WEIGHTS`` into a built detector: a checkpoint of ours, or a torchvision /
    detectron2 detector file, URL or zoo name (converted on the fly). Every parameter must be
    given and every key used; errors name the key (and both shapes)."""
    if not weights:
        return
    arch = META_ARCHITECTURES.get(type(model).__name__)
    if arch is not None and arch.load_weights is not None:
        arch.load_weights(model, weights)
        return
    from detection.modeling.convert import load_state_dict, to_ours
    from detection.modeling.predictor import read_weights

    ckpt = read_weights(weights)
    try:
        load_state_dict(model, to_ours(ckpt))
    except (KeyError, ValueError) as e:
        raise type(e)(f"{weights}: {e}") from e
    logger.info("Loaded weights from %s", weights)


def inference_config(config: Optional[str], weights: str) -> Any:
    """The config of an inference tool: ``config`` (name or path) when given, else the one
    stored in the checkpoint ``weights``."""
    if config is not None:
        from detection.config import load_config

        return load_config(config)
    return config_from_checkpoint(weights)


def config_from_checkpoint(path: str) -> Any:
    """The merged config stored in one of our checkpoints (what trained it)."""
    from fvcore.common.config import CfgNode as FvCfgNode

    from detection.config import get_cfg

    state = load_checkpoint(path)
    if not isinstance(state, dict) or not state.get("config"):
        raise ValueError(f"{path} carries no config: give --config as well")
    from detection.config import ConfigKeyError

    cfg = get_cfg()
    try:
        cfg.merge_from_other_cfg(FvCfgNode.load_cfg(state["config"]))
    except ConfigKeyError as e:
        raise ConfigKeyError(f"{path}: {e}. The checkpoint's config has keys that another "
                             "package registers: `import segmentation` before loading it "
                             "(the tools do)") from e
    return cfg


def build_model_from_cfg(cfg: Any) -> nn.Module:
    arch = _meta_arch(cfg)
    if arch is not None:
        return arch.build(cfg)
    from detection.modeling.build import build_model

    return build_model(cfg)


def inference_on_dataset(model: nn.Module, data_loader, evaluator) -> Dict[str, Any]:
    """Run ``model`` over ``data_loader`` (this rank's shard) and return
    ``evaluator.evaluate()`` (gathered over ranks; {} off the main process)."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    evaluator.reset()
    start = time.perf_counter()
    n = 0
    with torch.no_grad():
        for batch in tqdm(data_loader, desc="eval", disable=not du.is_main_process(),
                          dynamic_ncols=True):
            device = next(model.parameters()).device
            outputs = model([d["image"].to(device) for d in batch])
            outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
            evaluator.process(batch, outputs)
            n += len(batch)
    elapsed = time.perf_counter() - start
    logger.info("Inference on %d images took %.1f s (%.3f s / image on this rank)", n, elapsed,
                elapsed / max(n, 1))
    results = evaluator.evaluate()
    model.train(was_training)
    return results


def build_evaluator(cfg: Any, dataset_name: str, output_dir: Optional[Path] = None):
    arch = _meta_arch(cfg)
    if arch is not None and arch.build_evaluator is not None:
        return arch.build_evaluator(cfg, dataset_name, output_dir)
    from detection.evaluation.coco_evaluation import COCOEvaluator

    tasks = ("bbox", "segm") if cfg.MODEL.get("MASK_ON", False) else ("bbox",)
    return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_dir,
                         engine=cfg.TEST.EVAL_ENGINE)


def evaluate(cfg: Any, model: nn.Module) -> Dict[str, Any]:
    """COCO evaluation of ``model`` on every dataset of ``cfg.DATASETS.TEST``."""
    from detection.data.build import build_test_loader

    unwrapped = getattr(model, "module", model)
    results: Dict[str, Any] = {}
    for name in cfg.DATASETS.TEST:
        loader = build_test_loader(cfg, name, mapper=_mapper(cfg, False))
        out_dir = Path(cfg.OUTPUT_DIR) / "inference" / dataset_dir_name(name)
        evaluator = build_evaluator(cfg, name, out_dir)
        res = inference_on_dataset(unwrapped, loader, evaluator)
        if du.is_main_process():
            for task, metrics in res.items():
                logger.info("%s %s: %s", name, task, format_ap_line(metrics))
        results[name] = res
    du.synchronize()
    return results if len(results) != 1 else next(iter(results.values()))


def dataset_dir_name(name: str) -> str:
    """A folder name for a dataset name (``JSON_FILE:IMAGE_DIR`` names become the json's stem)."""
    if ":" in name and name.rpartition(":")[0].endswith(".json"):
        name = Path(name.rpartition(":")[0]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


_SEM_SEG_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")


def format_ap_line(metrics: Dict[str, float]) -> str:
    keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", *_SEM_SEG_KEYS)
            if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.2f}" for k in keys)


def format_ap_table(results: Dict[str, Dict[str, float]]) -> str:
    """A markdown table: one row per task, the six COCO AP numbers (0-100)."""
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = ["| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for task, m in results.items():
        if isinstance(m, dict) and "AP" in m:
            lines.append(f"| {task} | " + " | ".join(f"{m.get(k, float('nan')):.2f}"
                                                    for k in keys) + " |")
    sem = {t: m for t, m in results.items() if isinstance(m, dict) and "mIoU" in m}
    if sem:  # semantic segmentation: mIoU and accuracies (0-100)
        lines = [] if len(lines) == 2 else [*lines, ""]
        lines += ["| task | " + " | ".join(_SEM_SEG_KEYS) + " |",
                  "|---" * (len(_SEM_SEG_KEYS) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(f"{m.get(k, float('nan')):.2f}"
                                           for k in _SEM_SEG_KEYS) + " |" for t, m in sem.items()]
    return "\n".join(lines)


def train(cfg: Any, *, resume: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train the detector ``cfg`` describes, evaluating periodically and at the end.
    Returns the trained model and the final evaluation results ({} off the main process)."""
    from detection.config import save_config
    from detection.data.build import build_train_loader

    output_dir = Path(cfg.OUTPUT_DIR)
    attach_dataset_metadata(cfg)
    if du.is_main_process():
        save_config(cfg, output_dir)
    seed_all(cfg.SEED)
    model = build_model_from_cfg(cfg)
    if cfg.MODEL.WEIGHTS and not resume:
        load_weights(model, cfg.MODEL.WEIGHTS)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = Checkpointer(
        output_dir, model=model, optimizer=optimizer, scheduler=scheduler,
        config_yaml=cfg.dump(), metadata=model.metadata.to_dict(),
    )
    start_iter = checkpointer.resume() if resume else 0
    if du.get_world_size() > 1:
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    else:
        train_model = model
    max_iter = int(cfg.SOLVER.MAX_ITER)
    writer = MetricsWriter(output_dir, max_iter=max_iter, start_iter=start_iter) \
        if du.is_main_process() else None
    clip = None
    if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
        clip = {"type": cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE,
                "value": cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE,
                "norm_type": cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE}
    trainer = Trainer(
        model=train_model, optimizer=optimizer, scheduler=scheduler,
        data_loader=build_train_loader(cfg, start_iter=start_iter,
                                       mapper=_mapper(cfg, True)), checkpointer=checkpointer,
        max_iter=max_iter, start_iter=start_iter,
        checkpoint_period=int(cfg.SOLVER.CHECKPOINT_PERIOD),
        eval_period=int(cfg.TEST.EVAL_PERIOD), evaluate_fn=lambda: evaluate(cfg, model),
        writer=writer, log_period=int(cfg.SOLVER.LOG_PERIOD), clip_grad=clip,
        amp=bool(cfg.SOLVER.AMP.ENABLED),
    )
    t0 = time.perf_counter()
    trainer.run()
    train_time = time.perf_counter() - t0
    logger.info("Training took %.1f s", train_time)
    results = evaluate(cfg, model) if cfg.DATASETS.TEST else {}
    if writer is not None:
        flat = flatten_results(results if cfg.DATASETS.TEST and len(cfg.DATASETS.TEST) == 1
                               else {})
        flat["train_time"] = train_time
        writer.write(max_iter, flat)
        writer.close()
        plot_curves(output_dir)
    return model, results
