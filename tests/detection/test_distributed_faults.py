"""Distributed faults: a rank that dies (SIGKILL) or raises makes the others exit soon, with an
error that names it, never a hang; ``--resume`` afterwards continues exactly.

The ranks are real ``tools/train_det.py`` processes over gloo, launched with the environment
torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); ``fault_inject.py`` kills
or breaks one of them from outside the library.
"""

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launching import REPO, free_port, tiny_shapes

from detection.engine import distributed as du
from detection.engine.checkpoint import load_checkpoint

INJECT = Path(__file__).with_name("fault_inject.py")
MAX_ITER = 5  # checkpoints after 2 and 4


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


def launch(train: str, out: Path, *, fault: str = "", resume: bool = False,
           limit: float = 400) -> list:
    """Two ranks of ``tools/train_det.py``; returns per rank ``(returncode, exit time,
    stderr)``. Waits at most ``limit`` seconds, then kills what is left and fails."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    opts = {"DATASETS.TRAIN": f"('{train}',)", "DATASETS.TEST": "()",
            "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2,
            "SOLVER.MAX_ITER": MAX_ITER, "SOLVER.WARMUP_ITERS": 2,
            "SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.LOG_PERIOD": 1,
            "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 96,
            "MODEL.FPN.OUT_CHANNELS": 16, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
            "OUTPUT_DIR": str(out)}
    cmd = [sys.executable, str(INJECT), str(REPO / "tools" / "train_det.py"), "--config",
           "faster_rcnn_r18_fpn_shapes.yaml"]
    for k, v in opts.items():
        cmd += [k, str(v)]
    if resume:
        cmd.append("--resume")
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), DETKIT_FAULT=fault, RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        logs.append(open(out / f"stderr_rank{rank}_{time.monotonic_ns()}.txt", "w+"))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[-1],
                                      env=env))
    ended = [None, None]
    start = time.monotonic()
    try:
        while None in ended and time.monotonic() - start < limit:
            for r, p in enumerate(procs):
                if ended[r] is None and p.poll() is not None:
                    ended[r] = time.monotonic()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        results.append((p.returncode, ended[r], log.read()))
        log.close()
    assert None not in ended, f"a rank hung for {limit} s: " + results[0][2][-2000:]
    return results


def survivor_exits_soon_naming(results, dead: int, *, dead_rc, phrase: str) -> str:
    """The survivor's stderr, after checking its exit code, exit time and message."""
    alive = 1 - dead
    rc_dead, t_dead, err_dead = results[dead]
    rc, t, err = results[alive]
    assert rc_dead == dead_rc, err_dead[-3000:]
    assert rc not in (0, None), err[-3000:]
    assert t - t_dead < 60, f"rank {alive} took {t - t_dead:.0f} s to stop"
    assert phrase in err, err[-3000:]
    return err


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_naming_it_and_resume_is_exact(tiny_data, tmp_path):
    straight = launch(tiny_data, tmp_path / "straight")
    assert [r[0] for r in straight] == [0, 0], straight[0][2][-3000:] + straight[1][2][-3000:]
    want = load_checkpoint(tmp_path / "straight" / "model_final.pth")

    out = tmp_path / "run"
    results = launch(tiny_data, out, fault="kill-step:3:1")
    err = survivor_exits_soon_naming(results, 1, dead_rc=-signal.SIGKILL, phrase="rank 1 ")
    assert "PeerFailure: rank 0 stops after 3 iterations: rank 1 " in err and "died" in err
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000002.pth"]

    results = launch(tiny_data, out, resume=True)
    assert [r[0] for r in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert "Resumed from" in results[0][2] and "model_0000002.pth at iteration 2" in \
        results[0][2]
    got = load_checkpoint(out / "model_final.pth")
    assert got["iteration"] == MAX_ITER and len(got["rng_ranks"]) == 2
    for k, v in want["model"].items():  # each rank continued its own random stream
        assert torch.equal(got["model"][k], v), k


@pytest.mark.slow
def test_a_raising_rank_stops_the_other_with_its_error(tiny_data, tmp_path):
    results = launch(tiny_data, tmp_path / "run", fault="raise-step:3:1")
    assert "RuntimeError: injected fault at iteration 3" in results[1][2]
    survivor_exits_soon_naming(results, 1, dead_rc=1,
                               phrase="rank 1 raised RuntimeError: injected fault")


@pytest.mark.slow
def test_a_killed_rank_0_stops_the_other_naming_it(tiny_data, tmp_path):
    results = launch(tiny_data, tmp_path / "run", fault="kill-step:3:0")
    survivor_exits_soon_naming(results, 0, dead_rc=-signal.SIGKILL, phrase="rank 0")


# ---- the watchdog alone, in this process: fast ------------------------------------------

def watchdogs(store_port: int, **kw):
    """Rank 0's and rank 1's watchdogs on a store at ``store_port`` (not started)."""
    made = []
    for rank in range(2):
        client = dist.TCPStore("127.0.0.1", store_port, is_master=False,
                               wait_for_workers=False, timeout=datetime.timedelta(seconds=5))
        made.append(du.RankWatchdog(
            client, rank=rank, world=2, prefix="t", interval=0.1,
            peer_timeout=kw.get("peer_timeout", 60.0), exit_grace=5.0,
            store_address=f"127.0.0.1:{store_port}", store_host=0))
    return made


def test_watchdog_blames_the_silent_rank_the_posted_failure_or_the_lost_store():
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    w0, w1 = watchdogs(port)
    w0.start()
    w1.start()
    time.sleep(0.3)
    assert w0.blame(wait=True) is None  # both alive: a rank's own error is its own
    w1.stop(done=False)  # rank 1 stops beating, as when SIGKILLed
    assert "rank 1 stopped sending heartbeats" in w0.blame(wait=True)
    w1.post("rank 1 raised ValueError: bad record")
    assert w0.blame(wait=False) == "rank 1 raised ValueError: bad record"
    w0.stop(done=True)
    del master  # the store's host is gone
    msg = w1.blame(wait=True)
    assert "rank 0, which hosts the rendezvous store" in msg and "unreachable" in msg


def test_watchdog_of_rank_0_declares_a_silent_peer_dead_and_the_others_abort(monkeypatch):
    armed = []
    monkeypatch.setattr(du, "arm_exit", lambda s: armed.append(s))  # instead of exiting
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    w0, w1 = watchdogs(port, peer_timeout=0.5)
    w0.start()
    # rank 1 never beats again (its machine vanished): rank 0 declares it within the timeout
    # (the watchdog's thread sets ``failure``, logs, then arms the exit: wait for both)
    deadline = time.monotonic() + 10
    while (w0.failure is None or not armed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w0.failure is not None and w0.failure.startswith("rank 1 sent no heartbeat")
    assert armed == [5.0]
    # a third party (rank 1's watchdog, started late) sees the abort and stops as well
    w1.start()
    deadline = time.monotonic() + 10
    while (w1.failure is None or len(armed) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w1.failure == w0.failure and armed == [5.0, 5.0]
    del master
