"""torch.distributed set-up and collectives: DDP under torchrun, gloo on CPU, nccl on CUDA.

Launch with ``torchrun --nproc_per_node N tools/train_det.py ...`` (add ``--nnodes``,
``--node_rank``, ``--master_addr`` and ``--master_port`` for several machines). Without
torchrun's environment everything runs in one process.
"""

import datetime
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


def init_distributed(backend: str = "") -> int:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1), pick this rank's
    GPU, and return the world size (1 without torchrun). The backend defaults to nccl when
    CUDA is available and gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_initialized():
        return get_world_size()
    if not backend:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return get_world_size()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on any rank (so that all ranks stop together)."""
    if not is_initialized() or get_world_size() == 1:
        return flag
    if device is None or dist.get_backend() == "gloo":
        device = torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def reduce_mean(values: Dict[str, float]) -> Dict[str, float]:
    """The mean over ranks of each scalar (for logging)."""
    if not is_initialized() or get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank. DDP keeps
    parameters identical, but each rank's last forward updates its own statistics; do this
    before evaluating or saving so that every replica is the same model."""
    if not is_initialized() or get_world_size() == 1:
        return
    module = getattr(model, "module", model)
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)
