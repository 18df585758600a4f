"""The CPU a model is compiled for: its model name, instruction-set flags, and the integer
dot-product ISA onnxruntime's kernels will pick on it.

Read from ``/proc/cpuinfo`` on Linux, from ``py-cpuinfo`` where it is installed elsewhere, and
from ``platform`` alone otherwise (then the ISA is the most conservative one of the architecture).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from qcompiler.errors import QCError

#: Integer dot-product instruction sets, best first within each architecture. onnxruntime's MLAS
#: picks its uint8 x int8 GEMM kernel by these (see targets' ``[cpu] accumulation``).
ISAS: dict[str, str] = {
    "avx512-vnni": "x86-64 with AVX512-VNNI (VPDPBUSD: products accumulated in int32)",
    "avx-vnni": "x86-64 with AVX-VNNI (VEX VPDPBUSD: products accumulated in int32)",
    "avx512": "x86-64 with AVX512BW, no VNNI (VPMADDUBSW: pairs of products summed in int16)",
    "avx2": "x86-64 with AVX2, no VNNI (VPMADDUBSW: pairs of products summed in int16)",
    "sse4": "x86-64 with SSE4.1 only",
    "arm64-dot": "ARM64 with the dot-product extension (SDOT/UDOT)",
    "arm64": "ARM64 without the dot-product extension",
}

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM = ("aarch64", "arm64", "armv8l")


@dataclass(frozen=True)
class CpuInfo:
    """What qcompiler knows of one CPU: enough to choose exact integer kernels and to print
    beside a benchmark's table."""

    model: str
    arch: str
    flags: frozenset[str]
    #: Where the facts came from: "/proc/cpuinfo", "py-cpuinfo", "platform", or "--cpu" when a user
    #: named an ISA to compile for another machine.
    source: str

    @property
    def isa(self) -> str:
        """The integer dot-product ISA onnxruntime runs on this CPU (a key of `ISAS`)."""
        f = self.flags
        if self.arch in _ARM:
            return "arm64-dot" if {"asimddp", "dotprod"} & f else "arm64"
        if "avx512_vnni" in f or "avx512vnni" in f:
            return "avx512-vnni"
        if "avx_vnni" in f or "avxvnni" in f:
            return "avx-vnni"
        if "avx512bw" in f:
            return "avx512"
        if "avx2" in f:
            return "avx2"
        return "sse4"

    def summary(self) -> str:
        """One line for reports and benchmarks: model, architecture, ISA and the flags that decide it."""
        shown = sorted(f for f in self.flags if f in _REPORTED_FLAGS)
        return f"{self.model} ({self.arch}, {self.isa}; flags: {' '.join(shown) or 'none of ' + ', '.join(sorted(_REPORTED_FLAGS))}; from {self.source})"


_REPORTED_FLAGS = frozenset({"sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni", "amx_int8", "asimd", "asimddp", "dotprod", "i8mm", "sve"})


def _from_proc_cpuinfo(text: str, arch: str) -> CpuInfo:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if not model and arch in _ARM:
        implementer = next((l.split(":")[1].strip() for l in text.splitlines() if l.lower().startswith("cpu implementer")), "")
        model = f"ARM CPU (implementer {implementer})" if implementer else "ARM CPU"
    return CpuInfo(model or platform.processor() or "unknown CPU", arch, frozenset(flags), "/proc/cpuinfo")


#: numpy's runtime CPUID features (``__cpu_features__``) by the /proc/cpuinfo flag they confirm.
_NUMPY_FLAGS = {"sse4_1": "SSE41", "avx": "AVX", "avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
                "avx512_vnni": "AVX512VNNI", "asimd": "ASIMD", "asimddp": "ASIMDDP"}


def _numpy_features() -> dict[str, bool] | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return None
    return dict(__cpu_features__)


def _confirmed(info: CpuInfo) -> CpuInfo:
    """The flags as this process's CPUID reports them (numpy asks it at import, with the OS's
    support for the wider registers checked). /proc/cpuinfo describes the host, which is not the
    CPU an emulator (qemu-user) or a masked VM presents: where the two disagree on a flag numpy
    knows, numpy wins, and flags only /proc/cpuinfo lists (avx_vnni) are then dropped."""
    features = _numpy_features()
    if not features:
        return info
    known = {flag: bool(features.get(name)) for flag, name in _NUMPY_FLAGS.items() if name in features}
    if all((flag in info.flags) == present for flag, present in known.items()):
        return info
    flags = {flag for flag, present in known.items() if present}
    return CpuInfo(info.model, info.arch, frozenset(flags), f"{info.source} corrected by this process's CPUID")


@functools.cache
def detect_cpu() -> CpuInfo:
    """The CPU this process runs on."""
    arch = platform.machine().lower()
    proc = Path("/proc/cpuinfo")
    if proc.exists():
        try:
            return _confirmed(_from_proc_cpuinfo(proc.read_text(errors="replace"), arch))
        except OSError:
            pass
    try:
        import cpuinfo  # py-cpuinfo, optional

        info = cpuinfo.get_cpu_info()
        return CpuInfo(info.get("brand_raw", "unknown CPU"), arch, frozenset(info.get("flags", [])), "py-cpuinfo")
    except Exception:  # noqa: BLE001 - optional library: absent or unable to read this OS
        pass
    # Apple silicon has the dot-product extension on every model.
    flags = frozenset({"dotprod"}) if arch in _ARM and platform.system() == "Darwin" else frozenset()
    return CpuInfo(platform.processor() or "unknown CPU", arch, flags, "platform")


def cpu_for_isa(isa: str) -> CpuInfo:
    """A CPU described only by its ISA (``qc compile --cpu avx2``): compiling for another machine."""
    if isa not in ISAS:
        raise QCError(f"unknown ISA {isa!r} (accepted: {', '.join(ISAS)})", option="--cpu")
    flags = {
        "avx512-vnni": {"avx2", "avx512f", "avx512bw", "avx512_vnni"},
        "avx-vnni": {"avx2", "avx_vnni"},
        "avx512": {"avx2", "avx512f", "avx512bw"},
        "avx2": {"avx2"},
        "sse4": {"sse4_1"},
        "arm64-dot": {"asimd", "asimddp"},
        "arm64": {"asimd"},
    }[isa]
    return CpuInfo(f"any {isa} CPU", "aarch64" if isa.startswith("arm64") else "x86_64", frozenset(flags), "--cpu")
