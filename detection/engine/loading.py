"""What a run loads before it trains or evaluates: the model its config names (through the
family table, :mod:`detection.families`), ``MODEL.WEIGHTS``, the training dataset's class
metadata, and the config a checkpoint carries."""

import logging
from pathlib import Path
from typing import Any, Optional

from torch import nn

from detection.families import get_family

__all__ = [
    "apply_checkpoint_fallback",
    "attach_dataset_metadata",
    "attach_evaluation_metadata",
    "build_model_from_cfg",
    "config_from_checkpoint",
    "inference_config",
    "load_weights",
    "merge_fallback_opts",
]

logger = logging.getLogger("detection.train")


def build_model_from_cfg(cfg: Any) -> nn.Module:
    """The model of ``cfg``'s family (``MODEL.META_ARCHITECTURE``), random heads."""
    return get_family(cfg).build(cfg)


# The keys a family's ``attach_metadata`` fills from a dataset (class names and ids; Panoptic
# FPN's stuff names), which a checkpoint's stored config carries too.
METADATA_KEYS = ("MODEL.CLASS_NAMES", "MODEL.CATEGORY_IDS", "MODEL.PANOPTIC_FPN.STUFF_CLASS_NAMES")


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return None
        node = node[part]
    return node


def _copy_metadata(source: Any, cfg: Any) -> None:
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    for key in METADATA_KEYS:
        value = _get(source, key)
        *parents, leaf = key.split(".")
        node = _get(cfg, ".".join(parents))
        if value is not None and node is not None and leaf in node:
            node[leaf] = value
    if was_frozen:
        cfg.freeze()


def _stored_config(weights: str) -> Optional[Any]:
    """The config stored in one of our checkpoints (a local ``.pth``), else None."""
    import torch
    from fvcore.common.config import CfgNode as FvCfgNode

    if not weights or not str(weights).endswith((".pth", ".pt")) or not Path(weights).is_file():
        return None
    try:  # memory-mapped: the tensors are not read
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours, or an old serialization: the test set decides
        return None
    if not isinstance(state, dict) or not state.get("config"):
        return None
    return FvCfgNode.load_cfg(state["config"])


def merge_fallback_opts(cfg: Any) -> None:
    """Merge ``SOLVER.AMP.FALLBACK_OPTS`` into ``cfg`` once (emptied, so that the saved config
    is the one that ran), keeping ``cfg`` frozen if it was."""
    opts = list(cfg.SOLVER.AMP.FALLBACK_OPTS)
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.SOLVER.AMP.FALLBACK_OPTS = []
    cfg.merge_from_list(opts)
    if frozen:
        cfg.freeze()


def apply_checkpoint_fallback(cfg: Any, weights: str) -> bool:
    """Merge ``cfg``'s ``SOLVER.AMP.FALLBACK_OPTS`` (its float32 recipe, which may change the
    model, e.g. the FPN's width) into ``cfg`` when ``weights`` is one of our checkpoints that
    was trained with them, so that the model is built as it was trained (and tested at the
    recipe's sizes) on whichever CPU evaluates or runs it. True when merged (logged).

    The checkpoint's stored config decides: it must hold the recipe's values of every
    ``MODEL.*`` key the recipe sets (of every key, for a recipe that sets none), so that a
    training run that also changed, say, ``INPUT.MIN_SIZE_TRAIN`` on its command line still
    counts."""
    opts = list(_get(cfg, "SOLVER.AMP.FALLBACK_OPTS") or [])
    if not opts or len(opts) % 2:
        return False
    stored = _stored_config(weights)
    if stored is None:
        return False
    probe = cfg.clone()
    probe.defrost()
    probe.merge_from_list(opts)
    keys = [k for k in opts[::2] if k.startswith("MODEL.")] or opts[::2]
    if any(_plain(_get(stored, k)) != _plain(_get(probe, k)) for k in keys):
        return False
    merge_fallback_opts(cfg)
    logger.info("%s was trained with the config's float32 recipe: SOLVER.AMP.FALLBACK_OPTS %s",
                weights, " ".join(f"{k}={v}" for k, v in zip(opts[::2], opts[1::2])))
    return True


def _plain(value: Any) -> Any:
    """Lists and tuples alike (a YAML round trip turns one into the other)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def attach_evaluation_metadata(cfg: Any) -> str:
    """``--eval-only``'s class metadata: from the config when it names its classes, else from
    ``MODEL.WEIGHTS`` when it is one of our checkpoints (its stored config), else from the
    first test dataset, checked as training checks it; never from the training json (COCO's
    is 448 MB). Returns where it came from."""
    from detection.data.build import use_datasets_root

    use_datasets_root(cfg)
    if cfg.MODEL.CLASS_NAMES:
        return "the config"
    stored = _stored_config(cfg.MODEL.WEIGHTS)
    if stored is not None and _get(stored, "MODEL.CLASS_NAMES"):
        _copy_metadata(stored, cfg)
        source = f"the checkpoint {cfg.MODEL.WEIGHTS}"
    elif cfg.DATASETS.TEST:
        probe = cfg.clone()
        probe.defrost()
        probe.DATASETS.TRAIN = (cfg.DATASETS.TEST[0],)
        get_family(cfg).attach_metadata(probe)
        _copy_metadata(probe, cfg)
        source = f"the test dataset {cfg.DATASETS.TEST[0]}"
    else:
        return "nowhere (no test dataset)"
    logger.info("Class names for evaluation from %s", source)
    return source


def attach_dataset_metadata(cfg: Any) -> None:
    """Copy the training dataset's class names (and category ids) into ``cfg.MODEL``, so
    that checkpoints carry them, and check the class count (the family says how)."""
    from detection.data.build import use_datasets_root

    use_datasets_root(cfg)
    get_family(cfg).attach_metadata(cfg)


def load_weights(model: nn.Module, weights: str, cfg: Any) -> None:
    """Load ``weights`` (``MODEL.WEIGHTS``) into a model built from ``cfg``, with the loader of
    ``cfg``'s family: a checkpoint of ours, or a peer's file, URL or zoo name, converted on
    the fly. Errors name the weights and the key (and both shapes)."""
    if weights:
        get_family(cfg).load_weights(model, weights)


def config_from_checkpoint(path: str, *, cfg: Optional[Any] = None) -> Any:
    """The merged config stored in one of our checkpoints (what trained it), merged into
    ``cfg`` (default: detection's ``get_cfg()``; give ``segmentation.config.get_cfg()`` for
    segmentation checkpoints)."""
    from fvcore.common.config import CfgNode as FvCfgNode

    from detection.config import ConfigKeyError, get_cfg
    from detection.engine.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or not state.get("config"):
        raise ValueError(f"{path} carries no config: give --config as well")
    cfg = get_cfg() if cfg is None else cfg
    stored = FvCfgNode.load_cfg(state["config"])
    _drop_removed_keys(stored, path)
    try:
        cfg.merge_from_other_cfg(stored)
    except ConfigKeyError as e:
        raise ConfigKeyError(f"{path}: {e}") from e
    if cfg.get("CUSTOM_IMPORTS"):  # the modules that registered its backbone, family, data
        from detection.custom_imports import import_modules

        import_modules(cfg.CUSTOM_IMPORTS, source=f"CUSTOM_IMPORTS of {path}")
    return cfg


def _drop_removed_keys(stored: Any, path: str) -> None:
    """Checkpoints written before a key was removed still carry it: the removed keys had no
    effect (see ``RENAMED_KEYS``), so they are dropped from a stored config, with a log line;
    in a user's YAML they stay an error."""
    from detection.defaults import RENAMED_KEYS

    for full_key in RENAMED_KEYS:
        *parents, leaf = full_key.split(".")
        node = stored
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            del node[leaf]
            logger.info("%s: dropped %s from its stored config (a key that had no effect)",
                        path, full_key)


def inference_config(config: Optional[str], weights: str, *, cfg: Optional[Any] = None) -> Any:
    """The config of an inference tool: ``config`` (name or path) merged into ``cfg`` when
    given, else the one stored in the checkpoint ``weights``."""
    if config is not None:
        from detection.config import load_config

        cfg = load_config(config, cfg=cfg)
        apply_checkpoint_fallback(cfg, weights)
        return cfg
    return config_from_checkpoint(weights, cfg=cfg)
