"""What the inference tools (demo, evaluation, submission) load: a model in the runtime and
precision that the command line or the config's ``TEST.RUNTIME`` / ``TEST.PRECISION`` name."""

import logging
from pathlib import Path
from typing import Any, Optional, Tuple

logger = logging.getLogger(__name__)


def add_runtime_arguments(parser: Any, when: str = "",
                          default_precision: str = "the config's TEST.PRECISION, fp32") -> None:
    """``--runtime`` and ``--precision`` on an argparse parser, both defaulting to None (the
    config's ``TEST.RUNTIME`` / ``TEST.PRECISION``, unless the tool says otherwise in
    ``default_precision``); ``when`` prefixes their help."""
    from . import PRECISIONS, RUNTIMES

    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help=f"{when}inference runtime (default: the config's TEST.RUNTIME, "
                             "torch)")
    parser.add_argument("--precision", choices=(*PRECISIONS, "auto", "int8"), default=None,
                        help=f"{when}fp32, bf16 (CPUs with native bf16 only), auto (bf16 "
                             "where native, else fp32) or int8 (--runtime openvino, an export "
                             "made with --precision int8); default: " + default_precision)


def retain_memory_for_inference(cfg: Optional[Any]) -> bool:
    """``backbones.cpu_memory.retain_freed_memory()`` for an inference tool's process on a
    CPU, unless the config's ``TEST.RETAIN_FREED_MEMORY`` is off (an export directory has no
    config: on). Returns whether it is in effect; says so in the log."""
    from backbones.cpu_memory import retain_freed_memory

    if cfg is not None and (not cfg.TEST.RETAIN_FREED_MEMORY
                            or not str(cfg.MODEL.DEVICE).startswith("cpu")):
        return False
    done = retain_freed_memory()
    if done:
        logger.info("CPU memory: glibc's malloc keeps freed memory for reuse "
                    "(TEST.RETAIN_FREED_MEMORY; backbones/cpu_memory.py)")
    return done


def is_export_dir(path: str) -> bool:
    return Path(path, "export.json").is_file()


def load_for_inference(config: Optional[str], weights: str, *, runtime: Optional[str] = None,
                       precision: Optional[str] = None,
                       cfg: Optional[Any] = None) -> Tuple[Any, Optional[Any]]:
    """-> (model, config). ``weights`` may be a directory written by
    ``tools/export_model.py`` (then the config is None and the runtime defaults to the
    export's own); otherwise ``config`` (a name or path, default: the one stored in the
    checkpoint) decides, and ``runtime`` / ``precision`` default to its ``TEST.RUNTIME`` /
    ``TEST.PRECISION``. ``cfg`` is the defaults tree to merge into (segmentation's for its
    models)."""
    from detection.engine.loading import inference_config
    from detection.modeling.predictor import load_model

    if is_export_dir(weights):
        retain_memory_for_inference(None)
        return load_model(weights, runtime=runtime or "torch",
                          precision=precision or "fp32"), None
    cfg = inference_config(config, weights, cfg=cfg)
    retain_memory_for_inference(cfg)
    model = load_model(cfg, weights, runtime=runtime or cfg.TEST.RUNTIME,
                       precision=precision or cfg.TEST.PRECISION)
    return model, cfg


def load_for_evaluation(cfg: Any) -> Any:
    """The model ``--eval-only`` evaluates: ``MODEL.WEIGHTS`` in ``TEST.RUNTIME`` at
    ``TEST.PRECISION``. For torch and fp32 that is the plain eager model, the one training
    evaluates; with ``TEST.AUG.ENABLED`` it is wrapped for test-time augmentation
    (``detection.modeling.tta``)."""
    from detection.engine.loading import (
        apply_checkpoint_fallback,
        build_model_from_cfg,
        load_weights,
    )
    from detection.modeling.predictor import load_model
    from detection.modeling.tta import build_tta_model

    apply_checkpoint_fallback(cfg, cfg.MODEL.WEIGHTS)
    runtime, precision = cfg.TEST.RUNTIME, cfg.TEST.PRECISION
    retain_memory_for_inference(cfg)
    if runtime == "torch" and precision == "fp32":
        model = build_model_from_cfg(cfg)
        load_weights(model, cfg.MODEL.WEIGHTS, cfg)
        logger.info("Evaluating the eager model in fp32 (TEST.PRECISION)")
        return build_tta_model(cfg, model)
    return load_model(cfg, cfg.MODEL.WEIGHTS, runtime=runtime, precision=precision)
