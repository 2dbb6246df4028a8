"""Under torch.distributed (2 gloo processes), rank 0 checks the data and every rank keeps the
same records."""

import os
import socket

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from detection.config import get_cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import detection.data.build as build

        if rank == 1:  # only rank 0 may look at the files
            def refuse(*args, **kwargs):
                raise AssertionError("rank 1 ran the data check")

            build.check_records = refuse
        records = [{"file_name": os.path.join(root, f"{i}.png"), "height": 20, "width": 30,
                    "image_id": i, "annotations": []} for i in range(6)]
        cfg = get_cfg()
        cfg.DATALOADER.SKIP_MISSING_IMAGES = True
        kept = build.checked_records(cfg, records, mode="full")
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(",".join(str(r["image_id"]) for r in kept))
    finally:
        dist.destroy_process_group()


def test_rank0_checks_and_every_rank_keeps_the_same(tmp_path):
    for i in range(6):
        if i != 2:  # 2.png is missing, 4.png is not an image
            Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "4.png").write_text("text")
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    got = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert got == ["0,1,3,5", "0,1,3,5"]


