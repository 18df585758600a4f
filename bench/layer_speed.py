"""What ort-cpu's per-layer speed check (targets/ort-cpu.toml [speed]) costs and changes, per model.

    python bench/layer_speed.py                                   # ResNet-20 (bundled) and ResNet-56 (../shared)
    python bench/layer_speed.py --model mbv2.onnx:calib.npz       # any model with its calibration .npz

For each model: `qc compile --target ort-cpu` with the check on, in an empty cache (what the first
compile on a machine pays) and again (read from the cache), and with `insert-qdq{speed-check=false}`;
then whole-network batch-1 latency of float, check-on and check-off models, block-interleaved in one
loop (onnxruntime, ORT_ENABLE_ALL, the verifier's session options), and each model's output SQNR
as onnxruntime runs it on the calibration file's held-out last fifth (qc compile's verification).
The CPU (model, ISA flags) and onnxruntime version are printed above the table, the command below it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

import qcompiler
from qcompiler.cpu import detect_cpu
from qcompiler.data import DataSource, InputSpec
from qcompiler.ir import load_model, to_proto
from qcompiler.runtime import make_session
from qcompiler.targets.spec import load_target
from qcompiler.verify import interleaved_latency

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [f"{ROOT / 'models/cifar10_resnet20.onnx'}:{ROOT / 'models/cifar10_calib.npz'}", f"{ROOT.parent / 'shared/models/cifar10_resnet56.onnx'}:{ROOT / 'models/cifar10_calib.npz'}"]


def _speed(report) -> dict:
    return next(p.stats for p in report.passes if p.name == "insert-qdq").get("speed_check", {})


def run(model: str, calib: str, runs: int) -> dict:
    off_pipeline = load_target("ort-cpu").pipeline.replace("insert-qdq", "insert-qdq{speed-check=false}")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        start = time.perf_counter()
        on = qcompiler.compile(model, "ort-cpu", calib, latency_runs=0)
        first_s = time.perf_counter() - start
        again = qcompiler.compile(model, "ort-cpu", calib, latency_runs=0, verify=False)
        off = qcompiler.compile(model, "ort-cpu", calib, pipeline=off_pipeline, latency_runs=0)
    first, cached = _speed(on.report), _speed(again.report)
    protos = [to_proto(load_model(model)), to_proto(on.model), to_proto(off.model)]
    sessions = [make_session(p) for p in protos]
    spec = InputSpec.of_model(load_model(model))
    feed = {k: v[:1] for k, v in DataSource.from_npz(calib, spec).for_inputs(spec).arrays.items()}
    ms, _ = interleaved_latency(sessions, feed, cycles=max(1, runs // 10), block=10)
    return {
        "model": Path(model).name,
        "layers": len(first.get("layers", [])),
        "left_float": first.get("left_float"),
        "first_check_s": first.get("seconds"),
        "timed": first.get("layers_timed"),
        "cached_check_s": cached.get("seconds"),
        "compile_s": first_s,
        "same_graph": protos[1].graph.SerializeToString(deterministic=True) == protos[2].graph.SerializeToString(deterministic=True),
        "float_ms": ms[0], "on_ms": ms[1], "off_ms": ms[2],
        "sqnr_on": min(o.sqnr_db for o in on.report.verification.outputs),
        "sqnr_off": min(o.sqnr_db for o in off.report.verification.outputs),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="MODEL.onnx:CALIB.npz (repeatable)")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per model in the latency loop")
    args = parser.parse_args(argv)
    print(f"CPU: {detect_cpu().summary()}; onnxruntime {ort.__version__}; {os.cpu_count()} CPUs")
    header = f"{'model':28s} {'layers':>6s} {'timed':>5s} {'float':>5s} {'1st s':>6s} {'cached s':>8s} {'same graph':>10s} {'fp32 ms':>8s} {'on ms':>7s} {'off ms':>7s} {'SQNR on':>8s} {'SQNR off':>8s}"
    print(header)
    for item in args.model or DEFAULT:
        model, calib = item.rsplit(":", 1)
        r = run(model, calib, args.runs)
        print(f"{r['model']:28s} {r['layers']:6d} {r['timed']:5d} {r['left_float']:5d} {r['first_check_s']:6.2f} {r['cached_check_s']:8.3f} {str(r['same_graph']):>10s} {r['float_ms']:8.3f} {r['on_ms']:7.3f} {r['off_ms']:7.3f} {r['sqnr_on']:8.2f} {r['sqnr_off']:8.2f}", flush=True)
    print(f"command: python bench/layer_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())


if __name__ == "__main__":
    main()
