"""The CPU qcompiler compiles for: parsed, confirmed by this process's CPUID, or named by --cpu."""

from __future__ import annotations

import pytest

from qcompiler import cpu as cpu_module
from qcompiler.cpu import ISAS, CpuInfo, cpu_for_isa, detect_cpu
from qcompiler.errors import QCError

EPYC_ROME = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma bmi2
"""
ICELAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C
flags\t\t: sse4_1 avx avx2 fma avx512f avx512bw avx512_vnni
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(("text", "arch", "isa", "model"), [
    (EPYC_ROME, "x86_64", "avx2", "AMD EPYC 7B12"),
    (ICELAKE, "x86_64", "avx512-vnni", "Intel(R) Xeon(R) Platinum 8375C"),
    (GRAVITON, "aarch64", "arm64-dot", "ARM CPU (implementer 0x41)"),
])
def test_proc_cpuinfo_gives_the_isa(text, arch, isa, model):
    info = cpu_module._from_proc_cpuinfo(text, arch)
    assert info.isa == isa and info.model == model
    assert isa in info.summary() and model in info.summary()


def test_isa_order_prefers_exact_accumulation():
    assert CpuInfo("x", "x86_64", frozenset({"avx2", "avx_vnni"}), "t").isa == "avx-vnni"
    assert CpuInfo("x", "x86_64", frozenset({"avx2", "avx512bw"}), "t").isa == "avx512"
    assert CpuInfo("x", "x86_64", frozenset({"sse4_1"}), "t").isa == "sse4"
    assert CpuInfo("x", "aarch64", frozenset({"asimd"}), "t").isa == "arm64"


def test_cpuid_overrides_a_host_cpuinfo_that_describes_another_cpu(monkeypatch):
    # Under qemu-user /proc/cpuinfo is the host's (VNNI) while CPUID is the emulated AVX2 CPU's.
    host = cpu_module._from_proc_cpuinfo(ICELAKE + "flags\t: avx_vnni\n", "x86_64")
    features = {"SSE41": True, "AVX": True, "AVX2": True, "FMA3": True, "AVX512F": False, "AVX512BW": False, "AVX512VNNI": False}
    monkeypatch.setattr(cpu_module, "_numpy_features", lambda: features)
    seen = cpu_module._confirmed(host)
    assert seen.isa == "avx2" and "corrected" in seen.source
    agreeing = cpu_module._from_proc_cpuinfo(EPYC_ROME, "x86_64")
    assert cpu_module._confirmed(agreeing) is agreeing


def test_this_machine_is_detected():
    info = detect_cpu()
    assert info.isa in ISAS and info.model


def test_cpu_for_isa_and_unknown_isa():
    for isa in ISAS:
        assert cpu_for_isa(isa).isa == isa
    with pytest.raises(QCError, match="unknown ISA 'avx3'.*avx2"):
        cpu_for_isa("avx3")
