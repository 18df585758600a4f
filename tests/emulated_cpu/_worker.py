"""Runs inside ``qemu-x86_64 -cpu <model>``: one onnxruntime session, or a CPUID probe.

Invoked by `tests.emulated_cpu.run` as a plain script (no package imports, so it starts fast)::

    python _worker.py probe OUT.json
    python _worker.py run MODEL.onnx FEEDS.npz OUT.npz OPTIONS.json

The probe reads CPUID with a few bytes of machine code (``/proc/cpuinfo`` under qemu-user is the
host's file, not the emulated CPU's, so it must not be trusted there).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys
import time

# push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes([
    0x53, 0x49, 0x89, 0xD0, 0x89, 0xF8, 0x89, 0xF1, 0x0F, 0xA2,
    0x41, 0x89, 0x00, 0x41, 0x89, 0x58, 0x04, 0x41, 0x89, 0x48, 0x08, 0x41, 0x89, 0x50, 0x0C,
    0x5B, 0xC3,
])


def cpuid_flags() -> dict:
    """Vendor and the instruction-set bits that decide onnxruntime's int8 GEMM kernel."""
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_CPUID_CODE)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(
        ctypes.addressof(ctypes.c_char.from_buffer(buf)))

    def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        fn(leaf, sub, ctypes.addressof(out))
        return tuple(out)

    max_leaf, b0, c0, d0 = cpuid(0)
    vendor = (b0.to_bytes(4, "little") + d0.to_bytes(4, "little") + c0.to_bytes(4, "little")).decode(errors="replace")
    _, _, c1, d1 = cpuid(1)
    b7 = c7 = d7 = a71 = 0
    if max_leaf >= 7:
        a70, b7, c7, d7 = cpuid(7, 0)
        if a70 >= 1:
            a71 = cpuid(7, 1)[0]
    bits = {
        "sse4_1": c1 >> 19, "sse4_2": c1 >> 20, "avx": c1 >> 28, "fma": c1 >> 12, "ssse3": c1 >> 9,
        "avx2": b7 >> 5, "avx512f": b7 >> 16, "avx512bw": b7 >> 30, "avx512vl": b7 >> 31,
        "avx512_vnni": c7 >> 11, "avx_vnni": a71 >> 4, "amx_int8": d7 >> 25,
    }
    return {"vendor": vendor, "flags": sorted(k for k, v in bits.items() if v & 1)}


def _run(model: str, feeds_path: str, out_path: str, options_path: str) -> None:
    import numpy as np
    import onnxruntime as ort

    with open(options_path) as f:
        opts = json.load(f)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts["optimization"]]
    so.intra_op_num_threads = opts.get("threads", 1)
    so.inter_op_num_threads = 1
    if opts.get("optimized_model_path"):
        so.optimized_model_filepath = opts["optimized_model_path"]
    for key, value in opts.get("config", {}).items():
        so.add_session_config_entry(key, str(value))
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    with np.load(feeds_path) as z:
        feeds = {k: z[k] for k in z.files}
    times = []
    for _ in range(max(1, opts.get("repeat", 1))):
        t2 = time.perf_counter()
        outs = sess.run(None, feeds)
        times.append(time.perf_counter() - t2)
    names = [o.name for o in sess.get_outputs()]
    np.savez(out_path, **{f"out{i}": o for i, o in enumerate(outs)},
             __meta__=np.array(json.dumps({"names": names, "session_s": t1 - t0, "run_s": times,
                                           "cpu": cpuid_flags(), "ort": ort.__version__})))


def main(argv: list[str]) -> int:
    if argv[0] == "probe":
        with open(argv[1], "w") as f:
            json.dump(cpuid_flags(), f)
        return 0
    if argv[0] == "run":
        _run(*argv[1:5])
        return 0
    print(f"unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
