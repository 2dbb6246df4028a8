"""Checkpoints: written atomically, loaded without running code, resumable exactly.

A checkpoint is a dict saved by ``torch.save``:

    model       state dict (our parameter names)
    config      the merged config as YAML text
    metadata    class names and dataset category ids (``Metadata.to_dict()``)
    iteration   iterations completed
    optimizer, scheduler    training state, present in training checkpoints
    rng         the saving process's RNG states (python, numpy, torch, cuda)
    rng_ranks   under DDP, every rank's RNG states in rank order
    extra       state dicts of registered objects, e.g. ``grad_scaler`` (AMP)

Files are written by ``detection.atomic_files`` (temporary file, fsync, rename, fsync of the
folder), so a process killed at any moment leaves every ``.pth`` readable. ``last_checkpoint``
in the same folder names the newest file (written the same way). :meth:`Checkpointer.resume`
does not trust it alone: it takes the newest *readable* ``model_*.pth``, and when a newer one
cannot be read it falls back to the next with a warning that names the bad file.
One file with its config and metadata is enough to run ``tools/demo.py`` or to evaluate.
"""

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detection.atomic_files import atomic_write, atomic_write_text, stray_temp_files

from . import distributed as du

logger = logging.getLogger(__name__)

LAST = "last_checkpoint"
_NUMBERED = re.compile(r"model_(\d+)\.pth$")


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


def _load_training_checkpoint(path: Path) -> Dict[str, Any]:
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise RuntimeError(f"{path} is not a training checkpoint (no 'model' and 'iteration')")
    return state


class Checkpointer:
    """Saves ``model_{iteration:07d}.pth`` (and ``model_final.pth``) into ``output_dir`` and
    resumes from the newest readable one.

    Objects with ``state_dict``/``load_state_dict`` that are created after the resume (the
    trainer's AMP ``GradScaler``) join with :meth:`register`; a state read by
    :meth:`resume` before they joined is loaded into them when they do.
    """

    def __init__(self, output_dir: os.PathLike, *, model: torch.nn.Module,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler: Optional[Any] = None, config_yaml: str = "",
                 metadata: Optional[Dict[str, Any]] = None, keep_last: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config_yaml, self.metadata = config_yaml, metadata or {}
        self.keep_last = keep_last
        self.extra: Dict[str, Any] = {}
        self._pending: Dict[str, Dict[str, Any]] = {}  # resumed states awaiting register()
        self.resumed_from: Optional[Path] = None

    def _model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)  # unwrap DDP

    def register(self, name: str, obj: Any) -> None:
        """Save ``obj.state_dict()`` under ``extra[name]`` in every checkpoint, and load the
        resumed one into it (now, if :meth:`resume` already ran)."""
        self.extra[name] = obj
        if name in self._pending:
            obj.load_state_dict(self._pending.pop(name))
            logger.info("Restored %s state from %s", name, self.resumed_from)

    def register_model_states(self) -> None:
        """Register the model's ``training_states()`` (name -> object with ``state_dict``),
        where it has them: e.g. RetinaNet's running foreground count."""
        states = getattr(self._model(), "training_states", None)
        for name, obj in (states() if states is not None else {}).items():
            self.register(name, obj)

    def save(self, name: str, iteration: int,
             rng_states: Optional[Sequence[Dict[str, Any]]] = None) -> Path:
        """Write ``output_dir/name.pth`` atomically. ``rng_states``: every rank's
        :func:`get_rng_state`, in rank order (default: this process's only)."""
        rng_states = list(rng_states) if rng_states is not None else [get_rng_state()]
        state = {
            "model": self._model().state_dict(),
            "config": self.config_yaml,
            "metadata": self.metadata,
            "iteration": int(iteration),
            "rng": rng_states[0],
        }
        if len(rng_states) > 1:
            state["rng_ranks"] = rng_states
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        extra = {k: obj.state_dict() for k, obj in self.extra.items()}
        extra = {k: sd for k, sd in extra.items() if sd}  # a disabled GradScaler gives {}
        if extra:
            state["extra"] = extra
        path = atomic_save(state, self.output_dir / f"{name}.pth")
        atomic_write_text(self.output_dir / LAST, path.name)
        logger.info("Saved checkpoint %s (iteration %d)", path, iteration)
        self._prune(path)
        return path

    def _prune(self, newest: Path) -> None:
        """Remove all but the ``keep_last`` newest periodic checkpoints (``SOLVER.MAX_TO_KEEP``;
        0 keeps all)."""
        if self.keep_last <= 0:
            return
        periodic = sorted(self.output_dir.glob("model_[0-9]*.pth"))
        for old in periodic[: -self.keep_last]:
            if old != newest:
                old.unlink()

    def last_checkpoint(self) -> Optional[Path]:
        """The file ``last_checkpoint`` names (the newest one written), if it exists."""
        marker = self.output_dir / LAST
        if not marker.is_file():
            return None
        path = self.output_dir / marker.read_text().strip()
        return path if path.is_file() else None

    def _candidates(self) -> List[Tuple[int, Path, Optional[Dict[str, Any]]]]:
        """``(iteration, path, state or None)`` of the checkpoints in ``output_dir``, newest
        first. ``model_final.pth`` is read to learn its iteration (None when unreadable, and
        then tried first)."""
        found: List[Tuple[int, Path, Optional[Dict[str, Any]]]] = []
        for path in self.output_dir.glob("model_*.pth"):
            m = _NUMBERED.match(path.name)
            if m:
                found.append((int(m.group(1)), path, None))
        final = self.output_dir / "model_final.pth"
        if final.is_file():
            try:
                state = _load_training_checkpoint(final)
                found.append((int(state["iteration"]), final, state))
            except RuntimeError:
                found.append((2**62, final, None))  # unreadable: reported when tried
        # newest first; at equal iterations model_final.pth before model_NNN.pth
        found.sort(key=lambda c: (c[0], c[1].name == "model_final.pth"), reverse=True)
        return found

    def _remove_stray_temp_files(self) -> None:
        for tmp in stray_temp_files(self.output_dir, "model_*.pth") + stray_temp_files(
                self.output_dir, LAST):
            logger.warning("Removing %s, left by a process killed while writing it", tmp)
            try:
                tmp.unlink()
            except OSError as e:
                logger.warning("Could not remove %s: %s", tmp, e)

    def find_resumable(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The newest readable checkpoint in ``output_dir`` and its state (None when there
        are no checkpoints). An unreadable newer one is skipped with a warning naming it;
        when none is readable, raises ``RuntimeError`` naming them all."""
        errors = []
        for _, path, state in self._candidates():
            if state is None:
                try:
                    state = _load_training_checkpoint(path)
                except RuntimeError as e:
                    logger.warning("Checkpoint %s is unreadable, trying an older one: %s",
                                   path, e)
                    errors.append(str(e))
                    continue
            return path, state
        if errors:
            raise RuntimeError(f"no readable checkpoint in {self.output_dir}: "
                               + "; ".join(errors) + ". Move them away to start over.")
        return None

    def resume(self) -> int:
        """Restore model, optimizer, scheduler, RNG (this rank's) and registered states from
        the newest readable checkpoint in ``output_dir``; return the iteration to continue
        from (0 when there is none). Temporary files of killed writes are removed."""
        if du.is_main_process():
            self._remove_stray_temp_files()
        found = self.find_resumable()
        if found is None:
            logger.info("No checkpoint in %s: starting from iteration 0", self.output_dir)
            return 0
        path, state = found
        marked = self.last_checkpoint()
        if marked is not None and marked != path:
            logger.info("%s names %s; resuming from the newer readable %s", LAST, marked.name,
                        path.name)
        try:
            self._model().load_state_dict(state["model"])
        except RuntimeError as e:
            raise RuntimeError(f"{path} does not fit the model being trained: {e}") from e
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self._restore_rng(state, path)
        self.resumed_from = path
        self._pending = dict(state.get("extra", {}))
        for name in list(self._pending):
            if name in self.extra:
                self.register(name, self.extra[name])
        logger.info("Resumed from %s at iteration %d", path, state["iteration"])
        return int(state["iteration"])

    @staticmethod
    def _restore_rng(state: Dict[str, Any], path: Path) -> None:
        rank, world = du.get_rank(), du.get_world_size()
        per_rank = state.get("rng_ranks")
        if per_rank is not None and len(per_rank) == world:
            set_rng_state(per_rank[rank])
        elif world == 1 and "rng" in state and per_rank is None:
            set_rng_state(state["rng"])
        elif "rng" in state:
            saved = len(per_rank) if per_rank is not None else 1
            logger.warning("%s was saved by %d process(es) and is resumed by %d: each rank "
                           "keeps its own fresh RNG stream, so the run is not a bit-exact "
                           "continuation", path, saved, world)
