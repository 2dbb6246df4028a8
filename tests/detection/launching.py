"""What the tests that start training processes share: a free port, an environment without
an outer launcher's variables, and a tiny shapes training set."""

import os
import socket
from pathlib import Path

from detection.data import shapes

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "tools" / "train_det.py"
# variables of an outer launcher (torchrun, SLURM's are dropped by prefix) that must not leak
# into the processes a test starts
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This process's environment without launcher variables, the repository on PYTHONPATH,
    one OpenMP thread, and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def tiny_shapes(root: Path) -> str:
    """A 12-image shapes training set under ``root``, as a ``JSON:IMAGE_DIR`` dataset name."""
    p = shapes.ensure_shapes_dataset(root=root, num_train=12, num_val=4, image_size=(96, 128))
    return f"{p.train_json}:{p.train_images}"
