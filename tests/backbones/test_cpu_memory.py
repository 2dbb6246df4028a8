"""``retain_freed_memory()``: after it, a large tensor allocated again is not page-faulted in
again; and the inference tools' switch (``TEST.RETAIN_FREED_MEMORY``) turns it on and off.

Both run in a fresh process: the setting is the whole process's, and the tests' own process
keeps glibc's defaults. Page faults are counted by the kernel (``ru_minflt``), not timed."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc only")

_FAULTS = """
import json, resource, sys
import torch
from backbones.cpu_memory import freed_memory_retained, retain_freed_memory

N = 16 << 20  # 64 MB of float32: above glibc's largest mmap threshold (32 MB)

def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(N)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(3):
    default = faults_of_one_allocation()
state = [freed_memory_retained()]
done = retain_freed_memory()
state.append(freed_memory_retained())
for _ in range(3):  # the heap grows: its pages are faulted in once (two places, alternating)
    faults_of_one_allocation()
retained = [faults_of_one_allocation() for _ in range(3)]
retain_freed_memory(False)
state.append(freed_memory_retained())
print(json.dumps({"default": default, "retained": retained, "done": done, "state": state}))
"""

_SWITCH = """
import json
from detection.config import get_cfg
from detection.deploy.loading import retain_memory_for_inference
from backbones.cpu_memory import freed_memory_retained

cfg = get_cfg()
result = {"default_key": cfg.TEST.RETAIN_FREED_MEMORY}
cfg.TEST.RETAIN_FREED_MEMORY = False
result["off"] = [retain_memory_for_inference(cfg), freed_memory_retained()]
cfg.TEST.RETAIN_FREED_MEMORY = True
cfg.MODEL.DEVICE = "cuda"
result["cuda"] = [retain_memory_for_inference(cfg), freed_memory_retained()]
cfg.MODEL.DEVICE = "cpu"
result["on"] = [retain_memory_for_inference(cfg), freed_memory_retained()]
print(json.dumps(result))
"""


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[always]" in path.read_text()


@pytest.mark.starts_processes
def test_a_large_tensor_allocated_again_is_not_page_faulted_again():
    r = _run(_FAULTS)
    assert r["done"] and r["state"] == [False, True, False]
    pages = (16 << 20) * 4 // 4096  # 16384 pages of 4 KB
    if not _huge_pages_always():  # glibc as it comes: a fresh mmap, every page faulted
        assert r["default"] > 0.9 * pages, r
    # retained: the heap's pages are reused; measured 0-2 faults
    assert max(r["retained"]) < 0.02 * pages, r


@pytest.mark.starts_processes
def test_the_inference_tools_switch_follows_the_config_key():
    r = _run(_SWITCH)
    assert r["default_key"] is True
    assert r["off"] == [False, False]
    assert r["cuda"] == [False, False]  # a CPU setting: not for a model on a GPU
    assert r["on"] == [True, True]
