"""Run onnxruntime under qemu-user with another CPU model (AVX2 without VNNI) to check that int8
kernels that saturate there (VPMADDUBSW) still give exact results. See `run`."""

from tests.emulated_cpu.run import (
    CPU_MODELS,
    emulated_cpuid,
    emulator_available,
    emulator_unavailable_reason,
    qemu_cpu_model,
    run_natively,
    run_on_emulated_cpu,
)

__all__ = [
    "CPU_MODELS",
    "emulated_cpuid",
    "emulator_available",
    "emulator_unavailable_reason",
    "qemu_cpu_model",
    "run_natively",
    "run_on_emulated_cpu",
]
