"""Setting up a run: logging (console and ``log.txt``, quiet on other ranks) and seeding."""

import logging
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed as du

__all__ = ["seed_all", "setup_logging"]


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not break a tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(output_dir: Optional[Path] = None) -> None:
    """INFO to the console and ``output_dir/log.txt`` on the main process; warnings elsewhere.
    Calling it again replaces the handlers it added before."""
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
