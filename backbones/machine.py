"""What this machine can run: the CPU's instruction sets, the GPUs, and from them the
precisions and kernels that the toolkit may use.

    from backbones import machine
    print(machine.describe())                       # one line, for benchmark headers
    machine.require_precision("bf16")               # PrecisionUnavailable on an AVX2-only CPU
    machine.require_precision("auto")               # "bf16" where native, else "fp32"

The CPU is read from ``/proc/cpuinfo`` (Linux; elsewhere from torch's view, with no flags);
``parse_cpuinfo`` takes the file's text, so tests feed it other CPUs' lines and
``simulate_cpu`` makes the rest of the process see them. bf16 counts as native where the CPU
has bf16 arithmetic or conversions in hardware (avx512_bf16, amx_bf16, avx_ne_convert). oneDNN
also runs bf16 convolutions on AVX-512 CPUs without them, by emulation, slower than float32;
on AVX2-only CPUs it refuses them. The toolkit uses bf16 (inference, autocast training,
OpenVINO's bf16) only where it is native, and refuses it elsewhere with ``PrecisionUnavailable``.
"""

import functools
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import torch

# the flags that the report lists, in this order, where the CPU has them
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                  "avx_vnni", "avx512_bf16", "avx_ne_convert", "amx_tile", "amx_bf16",
                  "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")  # any one of them: native bf16
AVX512_CORE = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products in hardware
PRECISIONS = ("fp32", "bf16")  # what models run in; "auto" resolves to one of them


class PrecisionUnavailable(RuntimeError):
    """A precision this machine cannot run (or not natively); the message names the missing
    CPU flags and the precisions that do run."""


@dataclass(frozen=True)
class CPUInfo:
    model: str
    flags: FrozenSet[str]
    cores: int  # logical CPUs this process may use
    arch: str = "x86_64"

    def has(self, *flags: str) -> bool:
        return all(f in self.flags for f in flags)

    @property
    def avx512(self) -> bool:
        return self.has(*AVX512_CORE)

    @property
    def bf16_native(self) -> bool:
        if self.arch == "aarch64":  # ARMv8.6's BF16 extension
            return "bf16" in self.flags
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in VNNI_FLAGS)

    @property
    def amx(self) -> bool:
        return self.has("amx_tile")

    def isa(self) -> str:
        """The widest vector instruction set in a word: AMX, AVX-512, AVX2 or the arch."""
        if self.amx:
            return "AMX"
        if self.avx512:
            return "AVX-512"
        if self.has("avx2"):
            return "AVX2"
        return self.arch


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    capability: Tuple[int, int]
    memory_gib: float

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class Machine:
    cpu: CPUInfo
    gpus: Tuple[GPUInfo, ...] = field(default_factory=tuple)

    def precisions(self, device: str = "cpu") -> Tuple[str, ...]:
        """The model precisions that run natively on ``device`` ("cpu", "cuda", "cuda:1")."""
        if device.startswith("cuda"):
            gpu = self._gpu(device)
            return ("fp32", "bf16") if gpu is not None and gpu.bf16 else ("fp32",)
        return ("fp32", "bf16") if self.cpu.bf16_native else ("fp32",)

    def kernels(self) -> Dict[str, str]:
        """The CPU kernels the toolkit chooses between, each with "yes" or why not."""
        onednn = torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_convolution_pointwise")
        no_bf16 = "no native bf16 (needs one of " + ", ".join(BF16_FLAGS) + ")"
        return {
            "oneDNN fused conv/linear fp32": "yes" if onednn else "torch built without oneDNN",
            "oneDNN fused conv bf16": ("yes" if onednn and self.cpu.bf16_native
                                       else no_bf16 if onednn else "no oneDNN"),
            "Winograd F(4x4)/F(6x6) fp32": "yes",
            "bf16 autocast training": "yes" if self.cpu.bf16_native else no_bf16,
            "OpenVINO bf16": "yes" if self.cpu.bf16_native else no_bf16,
            "int8 dot products (VNNI/AMX)": ("yes" if self.cpu.vnni else
                                             "no (int8 runs, without VNNI's speed-up)"),
        }

    def _gpu(self, device: str) -> Optional[GPUInfo]:
        index = int(device.split(":")[1]) if ":" in device else 0
        return next((g for g in self.gpus if g.index == index), None)


def parse_cpuinfo(text: str, cores: Optional[int] = None) -> CPUInfo:
    """A ``CPUInfo`` from the text of ``/proc/cpuinfo`` (its first processor's model name and
    flags; ``Features`` on ARM). ``cores`` defaults to the number of processor entries."""
    model, flags, count, arch = "unknown", "", 0, "x86_64"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            count += 1
        elif key == "model name" and model == "unknown":
            model = " ".join(value.split())
        elif key == "flags" and not flags:
            flags = value
        elif key == "Features" and not flags:
            flags, arch = value, "aarch64"
        elif key == "CPU implementer" and model == "unknown":
            model, arch = f"ARM (implementer {value.strip()})", "aarch64"
    return CPUInfo(model=model, flags=frozenset(flags.split()), cores=cores or count or 1,
                   arch=arch)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def _this_cpu() -> CPUInfo:
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read(), cores=_usable_cores())
    except OSError:
        return CPUInfo(model=platform.processor() or platform.machine(), flags=frozenset(),
                       cores=_usable_cores(), arch=platform.machine())
    return info


_simulated: List[CPUInfo] = []


def cpu_info() -> CPUInfo:
    """This CPU (or the one ``simulate_cpu`` stands in for it)."""
    return _simulated[-1] if _simulated else _this_cpu()


@contextmanager
def simulate_cpu(cpu: CPUInfo) -> Iterator[CPUInfo]:
    """Within the block, the toolkit chooses precisions and kernels as on ``cpu`` (for tests
    of the refusals and the choices; kernels the real CPU lacks are still never called)."""
    _simulated.append(cpu)
    try:
        yield cpu
    finally:
        _simulated.pop()


def gpu_info() -> Tuple[GPUInfo, ...]:
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(GPUInfo(i, p.name, (p.major, p.minor), p.total_memory / 2 ** 30))
    return tuple(gpus)


def this_machine() -> Machine:
    return Machine(cpu=cpu_info(), gpus=gpu_info())


def bf16_runs_natively(device: str = "cpu") -> bool:
    """Whether bf16 convolutions and matrix products are native on ``device``: on a CPU, one
    of ``BF16_FLAGS`` (and oneDNN present); on CUDA, compute capability 8.0 or more."""
    if str(device).startswith("cuda"):
        return "bf16" in this_machine().precisions(str(device))
    return cpu_info().bf16_native and torch.backends.mkldnn.is_available()


def require_precision(precision: str, device: str = "cpu", *, what: str = "") -> str:
    """``precision`` ("fp32", "bf16" or "auto") as it will run on ``device``: "auto" resolves to
    bf16 on a CPU with native bf16, else fp32 (on CUDA too: the bf16 split of the backbone is
    measured on CPUs only); "bf16" where it is not native raises ``PrecisionUnavailable``
    naming the missing flags. ``what`` names the caller in the error (for example
    "OpenVINO")."""
    if precision == "auto":
        cpu = not str(device).startswith("cuda")
        return "bf16" if cpu and bf16_runs_natively(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS + ('auto',)}, "
                         f"got {precision!r}")
    if precision == "bf16" and not bf16_runs_natively(device):
        where = f" for {what}" if what else ""
        if str(device).startswith("cuda"):
            raise PrecisionUnavailable(
                f"precision 'bf16'{where} needs a GPU of compute capability 8.0 or more; "
                f"{device} runs: fp32 (use precision='auto' to choose by machine)")
        cpu = cpu_info()
        raise PrecisionUnavailable(
            f"precision 'bf16'{where} needs a CPU with native bf16: one of the flags "
            f"{', '.join(BF16_FLAGS)}, none of which {cpu.model} has "
            f"({cpu.isa()}: {' '.join(f for f in REPORTED_FLAGS if f in cpu.flags) or 'none'})"
            f"; this machine runs: fp32 (use precision='auto' to choose by machine)")
    return precision


def describe(device: str = "cpu") -> str:
    """One line: the CPU's model, its widest vector ISA, the flags that matter, the cores,
    torch's kernel level and, on CUDA, the GPU."""
    cpu = cpu_info()
    flags = " ".join(f for f in REPORTED_FLAGS if f in cpu.flags) or "none"
    line = (f"CPU: {cpu.model} ({cpu.isa()}; flags {flags}; {cpu.cores} cores; "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"{torch.get_num_threads()} threads)")
    if str(device).startswith("cuda"):
        for gpu in gpu_info():
            line += (f"; GPU {gpu.index}: {gpu.name}, capability "
                     f"{gpu.capability[0]}.{gpu.capability[1]}, {gpu.memory_gib:.0f} GiB")
    return line


def report() -> str:
    """Several lines for a bug report: CPU, flags, GPUs, precisions and kernels."""
    m = this_machine()
    lines = [describe(),
             "flags of interest: " + " ".join(
                 f"{f}={'yes' if f in m.cpu.flags else 'no'}" for f in REPORTED_FLAGS),
             f"precisions on cpu: {', '.join(m.precisions('cpu'))}"]
    for key, value in m.kernels().items():
        lines.append(f"  {key}: {value}")
    if not m.gpus:
        lines.append("GPU: none (torch.cuda.is_available() is False)")
    for gpu in m.gpus:
        lines.append(f"GPU {gpu.index}: {gpu.name}, capability {gpu.capability[0]}."
                     f"{gpu.capability[1]}, {gpu.memory_gib:.1f} GiB; precisions "
                     f"{', '.join(m.precisions(f'cuda:{gpu.index}'))}")
    return "\n".join(lines)
