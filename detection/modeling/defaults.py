"""The model's part of detection's defaults tree, for code that builds a detector from a bare
``CfgNode``. The values are defined once, in :mod:`detection.defaults`."""

from fvcore.common.config import CfgNode


def add_model_config(cfg: CfgNode) -> CfgNode:
    """Set ``cfg.MODEL`` (replacing it) and ``cfg.INPUT`` (replacing it) to detection's
    defaults; returns ``cfg``."""
    from detection.defaults import detection_defaults

    defaults = detection_defaults()
    # nodes of cfg's own class, so that merging a YAML file into cfg finds equal node types
    cfg.MODEL = type(cfg)(defaults.MODEL)
    cfg.INPUT = type(cfg)(defaults.INPUT)
    return cfg
