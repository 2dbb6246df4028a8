"""The machine module: CPU flags parsed from real /proc/cpuinfo files of three CPU kinds, the
precisions and kernels they get, bf16 refused where it is not native (simulated CPUs), and
the environment report."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

from backbones import machine
from backbones.collect_env import collect_env
from backbones.machine import PrecisionUnavailable, parse_cpuinfo, simulate_cpu

DATA = Path(__file__).with_name("data")


def cpu(name: str) -> machine.CPUInfo:
    return parse_cpuinfo((DATA / f"cpuinfo_{name}.txt").read_text())


AVX2 = "amd_epyc_zen3_avx2"
AVX512 = "intel_xeon_cascade_lake_avx512"
AMX = "intel_xeon_sapphire_rapids_amx"


def test_parse_avx2_only_cpu():
    info = cpu(AVX2)
    assert info.model == "AMD EPYC" and info.cores == 2 and info.arch == "x86_64"
    assert info.has("avx2", "fma") and not info.avx512
    assert (info.isa(), info.bf16_native, info.vnni, info.amx) == ("AVX2", False, False, False)
    m = machine.Machine(cpu=info)
    assert m.precisions("cpu") == ("fp32",)
    kernels = m.kernels()
    assert kernels["Winograd F(4x4)/F(6x6) fp32"] == "yes"
    for key in ("oneDNN fused conv bf16", "bf16 autocast training", "OpenVINO bf16"):
        assert kernels[key].startswith("no"), (key, kernels[key])


def test_parse_avx512_cpu_without_bf16():
    info = cpu(AVX512)
    assert info.model.startswith("Intel(R) Xeon(R) Platinum 8259CL") and info.cores == 1
    assert info.avx512 and info.vnni and not info.bf16_native and info.isa() == "AVX-512"
    assert machine.Machine(cpu=info).precisions() == ("fp32",)


def test_parse_amx_cpu():
    info = cpu(AMX)
    assert info.model == "Intel(R) Xeon(R) Platinum 8488C" and info.cores == 2
    assert info.avx512 and info.bf16_native and info.vnni and info.amx
    assert info.has("avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni") and info.isa() == "AMX"
    m = machine.Machine(cpu=info)
    assert m.precisions("cpu") == ("fp32", "bf16")
    assert m.kernels()["bf16 autocast training"] == "yes"
    assert m.kernels()["int8 dot products (VNNI/AMX)"] == "yes"


def test_parse_arm_features_line():
    info = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
                         "CPU implementer\t: 0x41\n")
    assert info.arch == "aarch64" and info.bf16_native and info.isa() == "aarch64"


@pytest.mark.parametrize("name", [AVX2, AVX512])
def test_bf16_refused_where_not_native(name):
    with simulate_cpu(cpu(name)):
        assert machine.require_precision("auto") == "fp32"
        assert machine.require_precision("fp32") == "fp32"
        with pytest.raises(PrecisionUnavailable) as err:
            machine.require_precision("bf16", what="OpenVINO")
    message = str(err.value)
    for flag in machine.BF16_FLAGS:
        assert flag in message
    assert cpu(name).model in message and "for OpenVINO" in message and "runs: fp32" in message
    with pytest.raises(ValueError, match="precision must be one of"):
        machine.require_precision("fp16")


def test_auto_picks_bf16_where_native():
    with simulate_cpu(cpu(AMX)):
        assert machine.require_precision("auto") == "bf16"
        assert machine.require_precision("bf16") == "bf16"
        assert machine.bf16_runs_natively("cpu")


def test_this_cpu_never_claims_bf16_that_onednn_refuses():
    """What the toolkit calls native bf16 is a subset of what oneDNN has kernels for: a CPU
    that ours calls native never reaches oneDNN's 'bf16 path needs ...' error."""
    here = machine.cpu_info()
    if here.bf16_native and here.arch == "x86_64":
        assert torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert here.cores >= 1 and here.model
    assert machine.require_precision("auto") in ("fp32", "bf16")


def test_collect_env_names_versions_and_the_machine():
    text = collect_env()
    assert importlib.metadata.version("torch") in text
    for word in ("torchvision", "onnxruntime", "openvino", "resnet-detkit", "CPU: ",
                 "precisions on cpu", "Winograd"):
        assert word in text, word
    assert machine.cpu_info().model in text
