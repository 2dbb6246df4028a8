"""SLURM's launch without torchrun: ``srun`` starts every task itself and gives it
SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; :func:`launch_info` reads them (torchrun's
variables first), with MASTER_ADDR/MASTER_PORT for the store.

The parsing is tested on its own (fast). Two plain ``tools/train_det.py`` processes with SLURM's
variables train as one world of two, to the weights of torchrun's two processes, and when one of
them is killed the rank watchdog stops the other with an error naming it.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import LAUNCH_VARS, REPO, TRAIN, clean_env, free_port, tiny_shapes

from detection.engine import distributed as du
from detection.engine.checkpoint import load_checkpoint

INJECT = Path(__file__).with_name("fault_inject.py")

SLURM_2 = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}


@pytest.mark.parametrize("env, want", [
    ({}, du.LaunchInfo(0, 1, 0, "none")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "GROUP_RANK": "1",
      "MASTER_ADDR": "h", "MASTER_PORT": "29500"},
     du.LaunchInfo(3, 8, 1, "torchrun", 1, "h", "29500")),
    # torchrun inside a SLURM job: torchrun's variables win
    ({**SLURM_2, "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"},
     du.LaunchInfo(0, 4, 0, "torchrun")),
    # WORLD_SIZE=1 runs one process even inside a SLURM allocation of several tasks
    ({**SLURM_2, "SLURM_PROCID": "0", "WORLD_SIZE": "1"}, du.LaunchInfo(0, 1, 0, "torchrun")),
    ({**SLURM_2, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "12345"},
     du.LaunchInfo(1, 2, 1, "slurm", 0, "10.0.0.5", "12345")),
    ({**SLURM_2, "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu07", "MASTER_PORT": "1"},
     du.LaunchInfo(1, 2, 1, "slurm", 1, "gpu07", "1")),
    ({**SLURM_2, "SLURM_NODELIST": "gpu07,gpu08", "MASTER_PORT": "1"},
     du.LaunchInfo(1, 2, 1, "slurm", 0, "gpu07", "1")),
    # a compressed node list is not parsed: the node srun ran on hosts task 0
    ({**SLURM_2, "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
      "MASTER_PORT": "1"}, du.LaunchInfo(1, 2, 1, "slurm", 0, "10.1.2.3", "1")),
    # one task: no rendezvous, nothing else needed
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, du.LaunchInfo(0, 1, 0, "slurm")),
])
def test_launch_info_reads_torchrun_then_slurm(env, want):
    assert du.launch_info(env) == want


@pytest.mark.parametrize("env, message", [
    ({**SLURM_2, "SLURM_JOB_NODELIST": "gpu[07-08]", "MASTER_PORT": "1"},
     "set MASTER_ADDR"),
    ({**SLURM_2, "MASTER_PORT": "1"}, "set MASTER_ADDR"),
    ({**SLURM_2, "MASTER_ADDR": "h"}, "set MASTER_PORT"),
    ({**SLURM_2, "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_PORT='x' is not an integer"),
    ({**SLURM_2, "SLURM_PROCID": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "SLURM_PROCID=2 is outside SLURM_NTASKS=2"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
])
def test_launch_info_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        du.launch_info(env)


def test_local_rank_comes_from_either_launcher(monkeypatch):
    for name in [*LAUNCH_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)
    assert du.get_local_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert du.get_local_rank() == 1
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert du.get_local_rank() == 3


# ---- real processes ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


def train_args(train: str, out: Path) -> list:
    opts = {"DATASETS.TRAIN": f"('{train}',)", "DATASETS.TEST": "()",
            "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 4, "SOLVER.MAX_ITER": 4,
            "SOLVER.WARMUP_ITERS": 2, "SOLVER.CHECKPOINT_PERIOD": 0, "SOLVER.LOG_PERIOD": 1,
            "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 96,
            "MODEL.FPN.OUT_CHANNELS": 16, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
            "OUTPUT_DIR": str(out)}
    args = ["--config", "faster_rcnn_r18_fpn_shapes.yaml"]
    for k, v in opts.items():
        args += [k, str(v)]
    return args


def run_all(cmds: list, envs: list, out: Path, limit: float = 240) -> list:
    """Start every command at once; ``(returncode, exit time, stderr)`` of each."""
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i, (cmd, env) in enumerate(zip(cmds, envs)):
        logs.append(open(out / f"stderr{i}_{time.monotonic_ns()}.txt", "w+"))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[-1],
                                      env=env, cwd=REPO))
    ended = [None] * len(procs)
    start = time.monotonic()
    try:
        while None in ended and time.monotonic() - start < limit:
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.monotonic()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, log, t in zip(procs, logs, ended):
        log.seek(0)
        results.append((p.returncode, t, log.read()))
        log.close()
    assert None not in ended, f"a process ran over {limit} s: " + results[0][2][-3000:]
    return results


def srun(train: str, out: Path, *, fault_rank1: str = "") -> list:
    """Two tasks as ``srun --ntasks 2`` starts them on one machine: plain processes with
    SLURM's variables only (``fault_rank1``: DETKIT_FAULT for task 1 alone)."""
    port = str(free_port())
    cmds, envs = [], []
    for task in range(2):
        fault = fault_rank1 if task == 1 else ""
        cmds.append([sys.executable, *([str(INJECT)] if fault else []), str(TRAIN),
                     *train_args(train, out)])
        envs.append(clean_env(SLURM_PROCID=str(task), SLURM_NTASKS="2",
                              SLURM_LOCALID=str(task), SLURM_NODEID="0", SLURM_JOB_ID="77",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                              DETKIT_FAULT=fault))
    return run_all(cmds, envs, out)


@pytest.mark.starts_processes
def test_slurm_tasks_train_as_torchrun_processes_do(tiny_data, tmp_path):
    results = srun(tiny_data, tmp_path / "slurm")
    for task, (rc, _, err) in enumerate(results):
        assert rc == 0, f"task {task}: {err[-3000:]}"
    got = load_checkpoint(tmp_path / "slurm" / "model_final.pth")
    assert got["iteration"] == 4 and len(got["rng_ranks"]) == 2  # a world of two ranks
    assert not torch.equal(got["rng_ranks"][0]["torch"], got["rng_ranks"][1]["torch"])

    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(TRAIN), *train_args(tiny_data, out)]
    (rc, _, err), = run_all([cmd], [clean_env()], out)
    assert rc == 0, err[-3000:]
    want = load_checkpoint(out / "model_final.pth")
    assert got["model"].keys() == want["model"].keys()
    for k, v in want["model"].items():
        if v.is_floating_point():
            assert torch.allclose(got["model"][k], v, rtol=1e-6, atol=1e-7), k
        else:
            assert torch.equal(got["model"][k], v), k


@pytest.mark.starts_processes
def test_a_killed_slurm_task_stops_the_other_naming_it(tiny_data, tmp_path):
    results = srun(tiny_data, tmp_path / "run", fault_rank1="kill-step:2")
    (rc0, t0, err0), (rc1, t1, err1) = results
    assert rc1 == -signal.SIGKILL, err1[-3000:]
    assert rc0 not in (0, None) and t0 - t1 < 60, err0[-3000:]
    assert "PeerFailure: rank 0 stops after 2 iterations: rank 1 " in err0, err0[-3000:]
    assert "died" in err0
