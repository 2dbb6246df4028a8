"""Two machines as a cluster runs them: two torchrun agents (``--nnodes 2``, one process each)
on this machine run ``tools/train_det.py`` over gloo.

- Their final weights equal those of one machine with two processes. That is the equivalent
  run: SOLVER.IMS_PER_BATCH is split evenly over the ranks, and the sampler and the seeds are
  functions of (seed, rank, world size), so each rank sees the same images wherever it runs
  (one process with the whole batch would draw other augmentations and samples).
- A run preempted in iteration 3 (SIGTERM to every rank, as a scheduler sends it; the ranks
  agree on where to stop, there or one iteration later, and save a checkpoint there) and started
  again with ``--resume`` continues from that checkpoint's iteration and ends with the weights
  of the run that was never interrupted.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import REPO, TRAIN, clean_env, free_port, tiny_shapes

from detection.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.starts_processes

INJECT = Path(__file__).with_name("fault_inject.py")
MAX_ITER = 6
TERM_AT = 3  # the iteration in which the preempted run gets SIGTERM


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


def train_args(train: str, out: Path) -> list:
    opts = {"DATASETS.TRAIN": f"('{train}',)", "DATASETS.TEST": "()",
            "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 4,
            "SOLVER.MAX_ITER": MAX_ITER, "SOLVER.WARMUP_ITERS": 2,
            "SOLVER.CHECKPOINT_PERIOD": 0, "SOLVER.LOG_PERIOD": 1,
            "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 96,
            "MODEL.FPN.OUT_CHANNELS": 16, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
            "OUTPUT_DIR": str(out)}
    args = ["--config", "faster_rcnn_r18_fpn_shapes.yaml"]
    for k, v in opts.items():
        args += [k, str(v)]
    return args


def torchrun(train: str, out: Path, *, nnodes: int, nproc: int, resume: bool = False,
             fault: str = "", limit: float = 240) -> list:
    """``nnodes`` torchrun agents with ``nproc`` processes each, static rendezvous at
    127.0.0.1; returns ``(returncode, stderr)`` per agent. ``fault``: DETKIT_FAULT for
    ``fault_inject.py`` on every rank."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    script = [str(INJECT), str(TRAIN)] if fault else [str(TRAIN)]
    args = train_args(train, out) + (["--resume"] if resume else [])
    procs, logs = [], []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
               "--node_rank", str(node), "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--max_restarts", "0", *script, *args]
        logs.append(open(out / f"node{node}_{time.monotonic_ns()}.txt", "w+"))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[-1],
                                      env=clean_env(DETKIT_FAULT=fault), cwd=REPO))
    deadline = time.monotonic() + limit
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.kill()
            p.wait()
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append((p.returncode, log.read()))
        log.close()
    assert not hung, f"a torchrun agent ran over {limit} s: " + results[0][1][-3000:]
    return results


def assert_ok(results: list) -> None:
    for node, (rc, err) in enumerate(results):
        assert rc == 0, f"node {node} exited with {rc}: {err[-3000:]}"


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if v.is_floating_point():
            assert torch.allclose(got[k], v, rtol=1e-6, atol=1e-7), \
                f"{k}: max difference {(got[k] - v).abs().max().item():.3g}"
        else:
            assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def two_nodes(tiny_data, tmp_path_factory):
    """The uninterrupted two-node run: its final checkpoint."""
    out = tmp_path_factory.mktemp("two_nodes")
    assert_ok(torchrun(tiny_data, out, nnodes=2, nproc=1))
    final = load_checkpoint(out / "model_final.pth")
    assert final["iteration"] == MAX_ITER and len(final["rng_ranks"]) == 2  # world size 2
    return final


def test_two_nodes_equal_one_node_with_two_processes(tiny_data, two_nodes, tmp_path):
    assert_ok(torchrun(tiny_data, tmp_path / "one_node", nnodes=1, nproc=2))
    one_node = load_checkpoint(tmp_path / "one_node" / "model_final.pth")
    assert len(one_node["rng_ranks"]) == 2
    assert_same_weights(two_nodes["model"], one_node["model"])


def test_two_nodes_preempted_then_resumed_equal_an_uninterrupted_run(tiny_data, two_nodes,
                                                                     tmp_path):
    out = tmp_path / "preempted"
    results = torchrun(tiny_data, out, nnodes=2, nproc=1, fault=f"term-step:{TERM_AT}")
    assert all(rc != 0 for rc, _ in results), "a preempted agent reported success"
    saved_paths = list(out.glob("*.pth"))
    assert len(saved_paths) == 1, saved_paths  # no periodic checkpoint: the preemption's only
    saved = load_checkpoint(saved_paths[0])
    stop = saved["iteration"]
    assert TERM_AT <= stop < MAX_ITER and len(saved["rng_ranks"]) == 2
    assert saved_paths[0].name == f"model_{stop:07d}.pth"
    assert f"Stopped by SIGTERM at iteration {stop}" in results[0][1], results[0][1][-3000:]

    results = torchrun(tiny_data, out, nnodes=2, nproc=1, resume=True)
    assert_ok(results)
    assert f"{saved_paths[0].name} at iteration {stop}" in results[0][1], \
        results[0][1][-3000:]
    final = load_checkpoint(out / "model_final.pth")
    assert final["iteration"] == MAX_ITER
    assert_same_weights(final["model"], two_nodes["model"])
    moved = [k for k, v in saved["model"].items()
             if v.is_floating_point() and not torch.equal(v, final["model"][k])]
    assert len(moved) > 50  # the resumed run did train the remaining iterations
