"""Run onnxruntime as it runs on another x86-64 CPU, by executing it under ``qemu-x86_64 -cpu MODEL``.

qemu's user-mode emulator (Debian/Ubuntu package ``qemu-user``) translates every instruction with
TCG and answers CPUID with the chosen CPU model, so onnxruntime's MLAS picks the kernels that CPU
would get. The point is the int8 GEMM: without VNNI (AVX2, or AVX512BW without VNNI) MLAS's
u8 x s8 kernel sums pairs of products in int16 with saturation (VPMADDUBSW); with VNNI it
accumulates exactly. This host may have VNNI; the emulated CPU does not.

Limits found with qemu 7.2 (Debian bookworm): TCG emulates up to AVX2 (+FMA, F16C, BMI); it has
no AVX512 and no VNNI, so CPU models like Skylake-Server / Cascadelake-Server come out as AVX2-only
CPUs (qemu prints "TCG doesn't support requested feature" and drops the bits). `emulator_available`
checks the emulated CPUID, so an "avx512" request is reported unavailable there instead of silently
testing AVX2.

``/proc/cpuinfo`` under qemu-user is the *host's* file: code that reads it (e.g. ``qcompiler.cpu``)
sees the host's flags inside the emulator. The worker reads CPUID itself.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_worker.py")

#: ISA names (as in ``qcompiler.cpu.ISAS``) -> qemu CPU model. Any other string is passed to
#: ``-cpu`` as is (see ``qemu-x86_64 -cpu help``).
CPU_MODELS: dict[str, str] = {
    "avx2": "Haswell-v4",            # Intel Haswell: AVX2 + FMA, no AVX512, no VNNI
    "avx2-amd": "EPYC-Rome",         # AMD Zen 2: AVX2 only (Zen 3 / EPYC-Milan likewise)
    "avx512": "Skylake-Server-v4",   # AVX512BW, no VNNI -- needs a qemu whose TCG does AVX512
    "avx512-vnni": "Cascadelake-Server-v4",
    "sse4": "Nehalem-v2",            # SSE4.2, no AVX
}

#: What the emulated CPUID must (first set) and must not (second set) report for the run to
#: stand for that ISA.
_EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "avx2": ({"avx2"}, {"avx512f", "avx512_vnni", "avx_vnni"}),
    "avx2-amd": ({"avx2"}, {"avx512f", "avx512_vnni", "avx_vnni"}),
    "avx512": ({"avx512bw"}, {"avx512_vnni", "avx_vnni"}),
    "avx512-vnni": ({"avx512_vnni"}, set()),
    "sse4": ({"sse4_1"}, {"avx", "avx2"}),
}

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def qemu_binary() -> str | None:
    """The qemu-x86_64 executable (``$QEMU_X86_64`` overrides), or None."""
    return shutil.which(os.environ.get("QEMU_X86_64") or "qemu-x86_64")


def qemu_cpu_model(cpu: str) -> str:
    return CPU_MODELS.get(cpu, cpu)


def _command(cpu: str, *args: str) -> list[str]:
    qemu = qemu_binary()
    if qemu is None:
        raise RuntimeError("qemu-x86_64 not found (apt-get install -y qemu-user)")
    return [qemu, "-cpu", qemu_cpu_model(cpu), sys.executable, str(WORKER), *args]


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed under qemu (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


@functools.lru_cache(maxsize=None)
def emulated_cpuid(cpu: str = "avx2", timeout: float = 120) -> dict:
    """``{"vendor": ..., "flags": [...]}`` as CPUID reports them inside ``qemu-x86_64 -cpu <cpu>``."""
    with tempfile.TemporaryDirectory(prefix="qc_qemu_") as tmp:
        out = Path(tmp) / "cpuid.json"
        proc = subprocess.run(_command(cpu, "probe", str(out)), capture_output=True, text=True, timeout=timeout)
        _check(proc, "CPUID probe")
        return json.loads(out.read_text())


@functools.lru_cache(maxsize=None)
def emulator_unavailable_reason(cpu: str = "avx2") -> str | None:
    """Why ``run_on_emulated_cpu(..., cpu)`` cannot stand for that CPU here, or None when it can."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 Linux host (this is {platform.system()} {platform.machine()})"
    if qemu_binary() is None:
        return "qemu-x86_64 not installed (apt-get install -y qemu-user)"
    try:
        info = emulated_cpuid(cpu)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        return f"qemu-x86_64 -cpu {qemu_cpu_model(cpu)} cannot run this Python: {str(exc).splitlines()[0]}"
    flags = set(info["flags"])
    must, must_not = _EXPECTED.get(cpu, (set(), set()))
    if not must <= flags or flags & must_not:
        return (f"qemu-x86_64 -cpu {qemu_cpu_model(cpu)} reports CPUID flags {sorted(flags)}, which is not a "
                f"{cpu} CPU (missing {sorted(must - flags)}, unwanted {sorted(flags & must_not)}); "
                "this qemu's TCG lacks those instructions")
    return None


def emulator_available(cpu: str = "avx2") -> bool:
    """True when qemu-x86_64 is installed and its ``cpu`` model really reports that ISA's CPUID."""
    return emulator_unavailable_reason(cpu) is None


def run_on_emulated_cpu(
    model_path: str | os.PathLike,
    feeds: dict[str, np.ndarray],
    cpu: str = "avx2",
    optimization: str = "all",
    *,
    session_config: dict[str, str] | None = None,
    threads: int = 1,
    repeat: int = 1,
    optimized_model_path: str | os.PathLike | None = None,
    timeout: float = 600,
    return_meta: bool = False,
):
    """Run ``model_path`` on ``feeds`` with onnxruntime's CPU provider inside ``qemu-x86_64 -cpu <cpu>``.

    ``cpu`` is a key of `CPU_MODELS` or a qemu CPU model name; ``optimization`` one of
    `OPTIMIZATION_LEVELS` ("all" lets the QDQ groups fuse into the integer kernels);
    ``session_config`` goes to ``SessionOptions.add_session_config_entry``. Returns the outputs in
    the session's order; with ``return_meta`` also a dict with the output names, the emulated
    CPUID ("cpu"), the session creation time and the time of each of ``repeat`` runs (seconds,
    emulated).
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, not {optimization!r}")
    with tempfile.TemporaryDirectory(prefix="qc_qemu_") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "feeds.npz", **{k: np.asarray(v) for k, v in feeds.items()})
        (tmp / "options.json").write_text(json.dumps({
            "optimization": optimization, "config": dict(session_config or {}), "threads": threads,
            "repeat": repeat, "optimized_model_path": str(optimized_model_path) if optimized_model_path else None,
        }))
        cmd = _command(cpu, "run", str(Path(model_path).resolve()), str(tmp / "feeds.npz"),
                       str(tmp / "out.npz"), str(tmp / "options.json"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        _check(proc, f"onnxruntime session on {model_path}")
        with np.load(tmp / "out.npz") as z:
            meta = json.loads(str(z["__meta__"]))
            outs = [z[f"out{i}"] for i in range(len(meta["names"]))]
    return (outs, meta) if return_meta else outs


def run_natively(
    model_path: str | os.PathLike,
    feeds: dict[str, np.ndarray],
    optimization: str = "all",
    *,
    session_config: dict[str, str] | None = None,
    threads: int = 1,
) -> list[np.ndarray]:
    """The same session as `run_on_emulated_cpu`, on this host's CPU (for side-by-side checks)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(key, str(value))
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
