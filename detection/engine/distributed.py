"""torch.distributed set-up and collectives: DDP under torchrun, gloo on CPU, nccl on CUDA.

Launch with ``torchrun --nproc_per_node N tools/train_det.py ...`` (add ``--nnodes``,
``--node_rank``, ``--master_addr`` and ``--master_port`` for several machines). Without
torchrun's environment everything runs in one process.

A rank that dies must not leave the others waiting in a collective. :func:`init_distributed`
therefore starts a :class:`RankWatchdog` on every rank, which talks to the rendezvous store
(``MASTER_ADDR:MASTER_PORT``, a connection of its own):

- every rank bumps a heartbeat counter each ``DETKIT_HEARTBEAT_S`` seconds (default 1);
- a rank whose main thread fails posts ``rank R raised ...`` to the store (an excepthook does
  it, wherever the exception comes from);
- when a collective fails (gloo reports a closed connection at once), :func:`explain_failure`
  names the rank to blame: the one that posted a failure, or the one whose heartbeat stopped
  (SIGKILL), or rank 0 when the store it hosts is gone. The trainer raises :class:`PeerFailure`
  with that name;
- rank 0 watches every heartbeat, and the others watch rank 0's and the failure board. A failure
  posted, or a heartbeat silent for ``DETKIT_PEER_TIMEOUT_S`` seconds (default 120: a machine
  gone without closing its sockets), is logged with the rank's name, and the process exits
  after ``DETKIT_EXIT_GRACE_S`` seconds (default 5) if its main thread has not stopped first.
  The exit uses ``faulthandler``'s C timer, which fires even when the main thread holds the
  GIL or is stuck in a collective, and prints every thread's stack.
"""

import atexit
import datetime
import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

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


def init_distributed(backend: str = "", *, timeout: datetime.timedelta = datetime.timedelta(
        minutes=30)) -> int:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1), pick this rank's
    GPU, start the :class:`RankWatchdog`, and return the world size (1 without torchrun).
    The backend defaults to nccl when CUDA is available and gloo otherwise. ``timeout``
    bounds a collective that waits for a live but slow rank (rank 0 saving a checkpoint);
    dead ranks are found by the watchdog much sooner."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_initialized():
        return get_world_size()
    if not backend:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
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
    """Which other rank made ``exc`` happen here (its message, or that it died), or None when
    this rank's own error is the cause. Waits a few heartbeats when ``exc`` could come from
    a collective (a ``RuntimeError``)."""
    if _WATCHDOG is None:
        return None
    return _WATCHDOG.blame(wait=isinstance(exc, RuntimeError))


def note_failure(exc: BaseException) -> None:
    """Post this rank's failure for the other ranks, and make sure the process ends within
    the grace time even if shutting down hangs on a broken process group."""
    if _WATCHDOG is None:
        return
    if isinstance(exc, PeerFailure):
        msg = f"rank {_WATCHDOG.rank} stopped because {exc}"
    else:
        cause = explain_failure(exc)
        msg = (f"rank {_WATCHDOG.rank} stopped because {cause}" if cause else
               f"rank {_WATCHDOG.rank} raised {type(exc).__name__}: {str(exc)[:500]}")
    _WATCHDOG.post(msg)
    _WATCHDOG.stop(done=False)
    arm_exit(_WATCHDOG.exit_grace)
