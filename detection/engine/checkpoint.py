"""Checkpoints: written atomically, loaded without running code, resumable exactly.

A checkpoint is a dict saved by ``torch.save``:

    model       state dict (our parameter names)
    config      the merged config as YAML text
    metadata    class names and dataset category ids (``Metadata.to_dict()``)
    iteration   iterations completed
    optimizer, scheduler, rng    training state, present in training checkpoints

``last_checkpoint`` in the same folder names the newest file. One file with its config and
metadata is enough to run ``tools/demo.py`` or to evaluate.
"""

import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from detection.atomic_files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

LAST = "last_checkpoint"


def atomic_save(obj: Any, path: os.PathLike) -> Path:
    """``torch.save`` atomically (see ``detection.atomic_files``)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def get_rng_state() -> Dict[str, Any]:
    """Every RNG the training loop draws from, as plain tensors, ints and tuples (loadable
    with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": (py_state[0], tuple(py_state[1]), py_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Read a checkpoint without running code (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: say which file
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e


class Checkpointer:
    """Saves ``model_{iteration:07d}.pth`` (and ``model_final.pth``) into ``output_dir``."""

    def __init__(self, output_dir: os.PathLike, *, model: torch.nn.Module,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler: Optional[Any] = None, config_yaml: str = "",
                 metadata: Optional[Dict[str, Any]] = None, keep_last: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config_yaml, self.metadata = config_yaml, metadata or {}
        self.keep_last = keep_last

    def _model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)  # unwrap DDP

    def save(self, name: str, iteration: int) -> Path:
        state = {
            "model": self._model().state_dict(),
            "config": self.config_yaml,
            "metadata": self.metadata,
            "iteration": int(iteration),
            "rng": get_rng_state(),
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        path = atomic_save(state, self.output_dir / f"{name}.pth")
        atomic_write_text(self.output_dir / LAST, path.name)
        logger.info("Saved checkpoint %s (iteration %d)", path, iteration)
        self._prune(path)
        return path

    def _prune(self, newest: Path) -> None:
        if self.keep_last <= 0:
            return
        periodic = sorted(self.output_dir.glob("model_[0-9]*.pth"))
        for old in periodic[: -self.keep_last]:
            if old != newest:
                old.unlink()

    def last_checkpoint(self) -> Optional[Path]:
        marker = self.output_dir / LAST
        if not marker.is_file():
            return None
        path = self.output_dir / marker.read_text().strip()
        return path if path.is_file() else None

    def resume(self) -> int:
        """Restore model, optimizer, scheduler and RNG states from the newest checkpoint in
        ``output_dir``; return the iteration to continue from (0 when there is none)."""
        path = self.last_checkpoint()
        if path is None:
            logger.info("No checkpoint in %s: starting from iteration 0", self.output_dir)
            return 0
        state = load_checkpoint(path)
        self._model().load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if "rng" in state:
            set_rng_state(state["rng"])
        logger.info("Resumed from %s at iteration %d", path, state["iteration"])
        return int(state["iteration"])
