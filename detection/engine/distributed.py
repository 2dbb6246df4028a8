"""torch.distributed set-up and collectives: DDP over gloo on CPU, nccl on CUDA.

Launch with ``torchrun`` (``--nproc_per_node``; ``--nnodes``, ``--node_rank``,
``--master_addr``, ``--master_port`` for several machines) or with SLURM's ``srun``, one task per
GPU: :func:`launch_info` reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or else SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT. Without either, one process runs.

A rank that dies must not leave the others waiting in a collective. :func:`init_distributed`
therefore starts a :class:`RankWatchdog` on every rank, connected to the rendezvous store
(``MASTER_ADDR:MASTER_PORT``). Every rank bumps a heartbeat counter each ``DETKIT_HEARTBEAT_S``
seconds (default 1); a rank whose main thread fails posts ``rank R raised ...`` (an excepthook
does it). When a collective fails, :func:`explain_failure` names the rank to blame (the one that
posted, the one whose heartbeat stopped, or rank 0 when the store it hosts is gone) and the
trainer raises :class:`PeerFailure`. Rank 0 watches every heartbeat, the others rank 0's and the
failure board: a posted failure, or a heartbeat silent for ``DETKIT_PEER_TIMEOUT_S`` seconds
(default 120), is logged with the rank's name, and the process exits after
``DETKIT_EXIT_GRACE_S`` seconds (default 5) unless its main thread stops first
(``faulthandler``'s C timer, which fires even in a stuck collective, and prints every stack).
"""

import atexit
import datetime
import faulthandler
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_WATCHDOG: Optional["RankWatchdog"] = None


class PeerFailure(RuntimeError):
    """This rank stops because another rank died or failed; the message names it."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a number") from None


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the launch, as its launcher's environment describes it."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" (or any launcher setting its variables), "slurm" or "none"
    node_rank: int = 0
    master_addr: str = ""  # SLURM: the rendezvous store's host (rank 0's machine)
    master_port: str = ""


def _env_int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name, "")
    if value == "" and default is not None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _first_plain_host(nodelist: str) -> Optional[str]:
    """The first host of a SLURM node list when it is written out plainly ("gpu07" or
    "gpu07,gpu08"), None for the compressed form ("gpu[07-08]")."""
    first = nodelist.split(",")[0].strip()
    return first if first and not any(c in first for c in "[]") else None


def _slurm_master_addr(env: Mapping[str, str]) -> str:
    """MASTER_ADDR, or else rank 0's machine from SLURM's variables: the first node of the
    step (task 0 runs there) when the list names it plainly, else the node srun ran on."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    for name in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"):
        if env.get(name):
            host = _first_plain_host(env[name])
            if host is not None:
                return host
            break
    if env.get("SLURM_LAUNCH_NODE_IPADDR"):
        return env["SLURM_LAUNCH_NODE_IPADDR"]
    listed = next((f"{n}={env[n]!r}" for n in ("SLURM_STEP_NODELIST", "SLURM_NODELIST",
                                              "SLURM_JOB_NODELIST") if env.get(n)), "none")
    raise ValueError(
        "SLURM launch without MASTER_ADDR: set MASTER_ADDR to the host of rank 0 (in the sbatch "
        "script: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head "
        f"-n 1)); the node list ({listed}) names no plain first host and "
        "SLURM_LAUNCH_NODE_IPADDR is not set")


def launch_info(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Rank, world size and local rank from ``env`` (default ``os.environ``): torchrun's
    RANK/WORLD_SIZE/LOCAL_RANK when WORLD_SIZE is set, else SLURM's SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID (SLURM_NODEID optional) with MASTER_ADDR/MASTER_PORT, else one process.
    A SLURM world of several tasks needs MASTER_PORT, and MASTER_ADDR unless it can be
    derived (see :func:`_slurm_master_addr`); a ``ValueError`` names what to set."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        world = _env_int(env, "WORLD_SIZE", 1)
        if world > 1 and "RANK" not in env:
            raise ValueError(f"WORLD_SIZE={world} but RANK is not set")
        info = LaunchInfo(rank=_env_int(env, "RANK", 0), world_size=world,
                          local_rank=_env_int(env, "LOCAL_RANK", 0), launcher="torchrun",
                          node_rank=_env_int(env, "GROUP_RANK", 0),
                          master_addr=env.get("MASTER_ADDR", ""),
                          master_port=env.get("MASTER_PORT", ""))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _env_int(env, "SLURM_NTASKS")
        addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
        if world > 1:
            addr = _slurm_master_addr(env)
            if not port:
                raise ValueError("SLURM launch without MASTER_PORT: set MASTER_PORT to a free "
                                 "port on rank 0's machine (e.g. export MASTER_PORT=29500)")
            _env_int(env, "MASTER_PORT")
        info = LaunchInfo(rank=_env_int(env, "SLURM_PROCID"), world_size=world,
                          local_rank=_env_int(env, "SLURM_LOCALID", 0), launcher="slurm",
                          node_rank=_env_int(env, "SLURM_NODEID", 0), master_addr=addr,
                          master_port=port)
    else:
        return LaunchInfo(rank=0, world_size=1, local_rank=0, launcher="none")
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        names = ("RANK", "WORLD_SIZE") if info.launcher == "torchrun" else (
            "SLURM_PROCID", "SLURM_NTASKS")
        raise ValueError(f"{names[0]}={info.rank} is outside {names[1]}={info.world_size}")
    return info


def get_local_rank() -> int:
    """This process's index on its machine (its GPU), under torchrun or SLURM; 0 alone."""
    return launch_info().local_rank


def init_distributed(backend: str = "", *, timeout: datetime.timedelta = datetime.timedelta(
        minutes=30)) -> int:
    """Join the process group that the launcher describes (:func:`launch_info`: torchrun or
    SLURM, world size > 1), pick this rank's GPU, start the :class:`RankWatchdog`, and return
    the world size (1 without a launcher). The backend defaults to nccl when CUDA is available
    and gloo otherwise. ``timeout`` bounds a collective that waits for a live but slow rank
    (rank 0 saving a checkpoint); dead ranks are found by the watchdog much sooner."""
    if is_initialized():
        return get_world_size()
    info = launch_info()
    if info.world_size <= 1:
        return 1
    if not backend:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        count = torch.cuda.device_count()
        if info.local_rank >= count > 1:
            raise ValueError(f"local rank {info.local_rank} but {count} GPUs are visible")
        # a task that sees one GPU (srun --gpus-per-task 1) uses it whatever its local rank
        torch.cuda.set_device(info.local_rank if count > 1 else 0)
    if info.launcher == "slurm":  # env:// and the watchdog read the store's address here
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = info.master_addr, info.master_port
        logger.info("SLURM launch: rank %d of %d (local rank %d, node %d), rendezvous at %s:%s",
                    info.rank, info.world_size, info.local_rank, info.node_rank,
                    info.master_addr, info.master_port)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank,
                            world_size=info.world_size, timeout=timeout)
    start_watchdog()
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


def any_rank_flags(flags: Sequence[bool], device: Optional[torch.device] = None) -> List[bool]:
    """For each flag, True on every rank when it is true on any rank (one all-reduce)."""
    if not is_initialized() or get_world_size() == 1:
        return [bool(f) for f in flags]
    if device is None or dist.get_backend() == "gloo":
        device = torch.device("cpu")
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on any rank (so that all ranks stop together)."""
    return any_rank_flags([flag], device)[0]


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


class RankWatchdog:
    """Heartbeats and a failure board in the rendezvous store; see the module doc."""

    def __init__(self, store: Any, *, rank: int, world: int, prefix: str, interval: float,
                 peer_timeout: float, exit_grace: float, store_address: str,
                 store_host: Optional[int]) -> None:
        self.store, self.rank, self.world, self.prefix = store, rank, world, prefix
        self.interval, self.peer_timeout, self.exit_grace = interval, peer_timeout, exit_grace
        self.store_address, self.store_host = store_address, store_host
        self.failure: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="detkit-rank-watchdog",
                                        daemon=True)
        self._last: Dict[int, int] = {}
        self._changed: Dict[int, float] = {}
        self._store_lost_since: Optional[float] = None

    def key(self, kind: str, rank: Any = "") -> str:
        return f"{self.prefix}/{kind}/{rank}"

    def start(self) -> None:
        self.store.add(self.key("hb", self.rank), 1)
        self._thread.start()

    def stop(self, *, done: bool) -> None:
        """Stop beating; ``done``: tell the others this rank finished (not died)."""
        self._stop.set()
        if done:
            try:
                self.store.set(self.key("done", self.rank), "1")
            except Exception:  # noqa: BLE001 - the store may already be gone at exit
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
                self._store_lost_since = None
            except Exception as e:  # noqa: BLE001 - the store is unreachable
                now = time.monotonic()
                self._store_lost_since = self._store_lost_since or now
                if now - self._store_lost_since > self.peer_timeout:
                    self._fail(self._store_lost(e))

    def _tick(self) -> None:
        self.store.add(self.key("hb", self.rank), 1)
        if self.store.check([self.key("abort")]):
            self._fail(self.store.get(self.key("abort")).decode())
            return
        now = time.monotonic()
        for peer in (range(self.world) if self.rank == 0 else [0]):
            if peer == self.rank or self.store.check([self.key("done", peer)]):
                continue
            beats = self.store.add(self.key("hb", peer), 0)
            if self._last.get(peer) != beats:
                self._last[peer], self._changed[peer] = beats, now
            elif now - self._changed[peer] > self.peer_timeout:
                msg = (f"rank {peer} sent no heartbeat for {now - self._changed[peer]:.0f} s "
                       "(killed, hung, or its machine is gone)")
                self.post(msg)
                self._fail(msg)

    def _store_lost(self, err: Exception) -> str:
        host = (f"rank {self.store_host}, which hosts " if self.store_host is not None
                else "the launcher hosting ")
        return f"{host}the rendezvous store {self.store_address}, is unreachable ({err})"

    def _fail(self, msg: str) -> None:
        if self.failure is not None:
            return
        self.failure = msg
        self._stop.set()
        logger.error("rank %d stops: %s. Exiting in %.0f s unless the main thread stops first",
                     self.rank, msg, self.exit_grace)
        arm_exit(self.exit_grace)

    def post(self, msg: str) -> None:
        """Put ``msg`` on the failure board (the first failure also becomes the abort)."""
        try:
            self.store.set(self.key("failed", self.rank), msg)
            if not self.store.check([self.key("abort")]):
                self.store.set(self.key("abort"), msg)
        except Exception:  # noqa: BLE001 - nothing more to tell anyone
            pass

    def blame(self, wait: bool) -> Optional[str]:
        """Who made this rank's collective fail: posted failures, else (``wait``: after
        watching ``2.5 * interval`` seconds) ranks whose heartbeat stopped; None if nobody."""
        if self.failure is not None:
            return self.failure
        try:
            posted = [self.store.get(self.key("failed", r)).decode()
                      for r in range(self.world)
                      if r != self.rank and self.store.check([self.key("failed", r)])]
            if posted or not wait:
                return "; ".join(posted) or None
            peers = [r for r in range(self.world) if r != self.rank]
            before = {r: self.store.add(self.key("hb", r), 0) for r in peers}
            time.sleep(2.5 * self.interval)
            silent = [r for r in peers if self.store.add(self.key("hb", r), 0) == before[r]
                      and not self.store.check([self.key("done", r)])]
            posted = [self.store.get(self.key("failed", r)).decode() for r in peers
                      if self.store.check([self.key("failed", r)])]
        except Exception as e:  # noqa: BLE001 - the store went away with its host
            return self._store_lost(e)
        if posted:
            return "; ".join(posted)
        if silent:
            names = ", ".join(str(r) for r in silent)
            return (f"rank {names} stopped sending heartbeats ({2.5 * self.interval:.1f} s "
                    "of silence): it died (killed?)")
        return None


def arm_exit(seconds: float) -> None:
    """End this process with code 1 in ``seconds``, whatever the main thread is doing
    (``faulthandler``'s timer thread runs without the GIL); every thread's stack is printed."""
    faulthandler.dump_traceback_later(max(seconds, 0.1), exit=True)


def start_watchdog() -> Optional[RankWatchdog]:
    """Start this rank's :class:`RankWatchdog` (once), if ``MASTER_ADDR``/``MASTER_PORT``
    name the rendezvous store."""
    global _WATCHDOG
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if _WATCHDOG is not None or not addr or not port or get_world_size() <= 1:
        return _WATCHDOG
    interval = _env_float("DETKIT_HEARTBEAT_S", 1.0)
    store = dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(10.0, 5 * interval)))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}." \
          f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    _WATCHDOG = RankWatchdog(
        store, rank=get_rank(), world=get_world_size(), prefix=f"detkit_watchdog/{run}",
        interval=interval, peer_timeout=_env_float("DETKIT_PEER_TIMEOUT_S", 120.0),
        exit_grace=_env_float("DETKIT_EXIT_GRACE_S", 5.0), store_address=f"{addr}:{port}",
        store_host=None if agent_store else 0)
    _WATCHDOG.start()
    atexit.register(_WATCHDOG.stop, done=True)
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):  # an uncaught exception: tell the other ranks
        try:
            note_failure(exc)
        finally:
            previous(exc_type, exc, tb)

    sys.excepthook = excepthook
    return _WATCHDOG


def explain_failure(exc: BaseException) -> Optional[str]:
    """Which other rank made ``exc`` happen here (its posted error, or that it died), or
    None when this rank's own error is the cause. Only a ``RuntimeError`` (what a failed
    collective raises) is examined, which takes a few heartbeats; the answer is kept on
    ``exc``."""
    if _WATCHDOG is None or not isinstance(exc, RuntimeError) or isinstance(exc, PeerFailure):
        return None
    if not hasattr(exc, "_detkit_cause"):
        exc._detkit_cause = _WATCHDOG.blame(wait=True)
    return exc._detkit_cause


def post_failure(exc: BaseException) -> None:
    """Tell the other ranks why this rank stops: its own error, or the rank it blames.
    Their watchdogs then stop them, even when this process lingers."""
    if _WATCHDOG is None:
        return
    if isinstance(exc, PeerFailure):
        msg = f"rank {_WATCHDOG.rank} stopped because {exc}"
    else:
        cause = explain_failure(exc)
        msg = (f"rank {_WATCHDOG.rank} stopped because {cause}" if cause else
               f"rank {_WATCHDOG.rank} raised {type(exc).__name__}: {str(exc)[:500]}")
    _WATCHDOG.post(msg)


def note_failure(exc: BaseException) -> None:
    """For an exception that ends this process: :func:`post_failure`, and make sure the
    process ends within the grace time even if shutting down hangs on a broken group."""
    if _WATCHDOG is None:
        return
    post_failure(exc)
    _WATCHDOG.stop(done=False)
    arm_exit(_WATCHDOG.exit_grace)
