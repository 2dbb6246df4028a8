"""Where training metrics go: the console (with ETA), ``metrics.json`` (one JSON object per
line), TensorBoard event files, and PNG plots of the loss and AP curves."""

import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

from detection.atomic_files import atomic_write_text

logger = logging.getLogger("detection.train")


class MetricsWriter:
    """Writes metrics from the main process. ``write(iteration, scalars)`` appends a JSON
    line and TensorBoard scalars; ``log(...)`` prints a console line with ETA."""

    def __init__(self, output_dir: Path, *, max_iter: int, start_iter: int = 0,
                 tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.output_dir / "metrics.json"
        self.max_iter, self.start_iter = max_iter, start_iter
        self._start_time = time.perf_counter()
        self._drop_records_after(start_iter)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # events past the checkpoint (a killed run's) are purged, as in metrics.json
                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"),
                                         purge_step=start_iter + 1 if start_iter else None)
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                logger.warning("tensorboard is not importable: no event files are written")

    def _drop_records_after(self, start_iter: int) -> None:
        """A run resumed from iteration ``start_iter`` redoes what a killed run logged after
        it: those records (and a line cut off by the crash) leave ``metrics.json``, so that
        each iteration appears once. A run started afresh (0) in the same folder replaces
        the old records, as it replaces the old checkpoints."""
        if not self.json_path.is_file():
            return
        kept, dropped = [], 0
        for record in read_metrics(self.json_path, keep_invalid=True):
            if record is not None and record.get("iteration", 0) <= start_iter:
                kept.append(json.dumps(record) + "\n")
            else:
                dropped += 1
        if dropped:
            atomic_write_text(self.json_path, "".join(kept))
            logger.info("%s: %d records after iteration %d dropped (they are redone)",
                        self.json_path, dropped, start_iter)

    def write(self, iteration: int, scalars: Dict[str, float]) -> None:
        record = {"iteration": iteration, **{k: float(v) for k, v in scalars.items()}}
        with open(self.json_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, iteration)
            self._tb.flush()

    def eta(self, iteration: int) -> str:
        done = iteration - self.start_iter
        if done <= 0:
            return "?"
        per_iter = (time.perf_counter() - self._start_time) / done
        return str(datetime.timedelta(seconds=int(per_iter * (self.max_iter - iteration))))

    def log(self, iteration: int, scalars: Dict[str, float]) -> None:
        losses = "  ".join(f"{k}: {v:.4f}" for k, v in scalars.items() if k.startswith("loss"))
        lr = scalars.get("lr", float("nan"))
        logger.info("iter %d/%d  eta %s  %s  lr %.3g", iteration, self.max_iter,
                    self.eta(iteration), losses, lr)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(json_path: Path, keep_invalid: bool = False) -> List[Optional[dict]]:
    """The JSON lines of ``metrics.json``; a line cut off by a crash is skipped (or, with
    ``keep_invalid``, read as None)."""
    records: List[Optional[dict]] = []
    with open(json_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) or keep_invalid:
                records.append(record if isinstance(record, dict) else None)
    return records


def plot_curves(output_dir: Path, records: Optional[List[dict]] = None) -> List[Path]:
    """``loss.png`` (every loss against iteration) and ``ap.png`` (bbox/segm AP against
    iteration, when evaluations were logged) in ``output_dir``. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    if records is None:
        path = output_dir / "metrics.json"
        if not path.is_file():
            return []
        records = read_metrics(path)
    written = []
    loss_keys = sorted({k for r in records for k in r if k.startswith("loss")})
    ap_keys = [k for k in ("bbox/AP", "bbox/AP50", "segm/AP", "sem_seg/mIoU")
               if any(k in r for r in records)]
    for keys, name, ylabel, log in ((loss_keys, "loss.png", "loss", True),
                                    (ap_keys, "ap.png", "AP / mIoU (0-100)", False)):
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            pts = [(r["iteration"], r[k]) for r in records if k in r]
            ax.plot(*zip(*pts), label=k, lw=1.0, marker=None if log else "o")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        written.append(output_dir / name)
    return written
