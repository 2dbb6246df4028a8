"""The names tests and scripts have imported from here, now in modules named for what they do:

- :mod:`detection.engine.run_setup`: ``setup_logging``, ``seed_all``
- :mod:`detection.engine.loading`: ``build_model_from_cfg``, ``attach_dataset_metadata``,
  ``load_weights``, ``config_from_checkpoint``, ``inference_config``
- :mod:`detection.engine.evaluation`: ``inference_on_dataset``, ``evaluate``,
  ``build_evaluator``, ``dataset_dir_name``
- :mod:`detection.engine.result_tables`: ``format_ap_line``, ``format_ap_table``
- :mod:`detection.engine.train_net`: ``train``, the train entry of ``tools/train_det.py``
- :mod:`detection.families`: the model family table that ``MODEL.META_ARCHITECTURE`` names
"""

from .evaluation import build_evaluator, dataset_dir_name, evaluate, inference_on_dataset
from .loading import (
    attach_dataset_metadata,
    build_model_from_cfg,
    config_from_checkpoint,
    inference_config,
    load_weights,
)
from .result_tables import format_ap_line, format_ap_table
from .run_setup import seed_all, setup_logging
from .train_net import train

__all__ = [
    "attach_dataset_metadata",
    "build_evaluator",
    "build_model_from_cfg",
    "config_from_checkpoint",
    "dataset_dir_name",
    "evaluate",
    "format_ap_line",
    "format_ap_table",
    "inference_config",
    "inference_on_dataset",
    "load_weights",
    "seed_all",
    "setup_logging",
    "train",
]
