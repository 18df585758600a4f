"""Per-layer speed check: is each weight layer faster quantized or in float, on this CPU?

insert-qdq asks this (when the target's ``[speed] keep_slower_float`` is on) and leaves float the
layers whose quantized form is measurably slower. Each Conv/Gemm/MatMul is cut out with its own
shapes (batch 1, `qcompiler.latency_table.layer_of`) and timed in onnxruntime with the verifier's
session options (all optimizations) in the two forms it can take between quantized neighbours:

- quantized, as the target compiles it, reading and writing integers;
- float, reading integers through a DequantizeLinear and writing them through a QuantizeLinear:
  the boundary a float layer between quantized neighbours pays, timed with it.

Each form runs once and `COPIES` times side by side; the difference over ``COPIES - 1`` is the
layer's own time, without what a session run costs besides its kernels. Outputs are bound to
preallocated buffers (IOBinding), so copying results back to Python, which a layer inside a
network never does, is not timed. The runs are block-interleaved; per cycle, each form's time
and their ratio are taken, and the medians over cycles reported, with the ratio's lower quartile.

onnxruntime (>= 1.21, WeightBiasQuantization) quantizes a float Conv/Gemm whose input comes from
a DequantizeLinear and whose output goes to a QuantizeLinear by itself, with per-tensor weights:
there such a layer cannot run in float. The float form's optimized graph is inspected, and such a
layer stays quantized (leaving it "float" would only coarsen its weights).

Results are cached on disk, keyed by everything they depend on (CPU model and flags, onnxruntime
version, thread count, op, shapes, attributes, dtypes, the method), under ``$XDG_CACHE_HOME/qcompiler``
(``~/.cache/qcompiler``), so a second compile of the same model measures nothing.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from qcompiler.cpu import CpuInfo, detect_cpu
from qcompiler.latency_table import COPIES, Layer, _compiled_at, layer_of
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import ProgressFactory, null_progress
from qcompiler.runtime import session_options
from qcompiler.targets.spec import IR_TYPES, SpeedRules, TargetSpec

#: Bumped whenever how a layer is timed changes: cached figures of another method are not reused.
METHOD_VERSION = 2
#: Interleaved cycles and runs per block for each form. 12 x 8 keeps ResNet-20's first check near a
#: second of timing on 2 cores; the per-cycle ratios still separate a 15 % slowdown from noise (the
#: ratio's spread over repeated checks of one layer was about +-10 % there).
CYCLES = 12
BLOCK = 8
#: Runs longer than this (the slowest of a layer's four sessions) get proportionally smaller
#: blocks, down to MIN_BLOCK: ResNet-20's layers (under 0.2 ms) keep the full block.
BLOCK_RUN_S = 0.5e-3
MIN_BLOCK = 3
#: Untimed runs before each timed block (caches and thread pool warm).
BLOCK_WARMUP = 2
#: Optimized-graph ops that mean onnxruntime ran a layer given in float as an integer kernel.
INTEGER_KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "DynamicQuantizeMatMul", "MatMulNBits"})


@dataclass(frozen=True)
class LayerTiming:
    """One layer's measured time in both forms (ms, batch 1, per layer)."""

    #: In float, between a DequantizeLinear and a QuantizeLinear, as onnxruntime runs that.
    float_ms: float
    #: As the target compiles it, reading and writing integers.
    quantized_ms: float
    #: Median over cycles of quantized / float time, and its lower quartile.
    slowdown: float
    slowdown_low: float
    #: What onnxruntime ran the float form as: "float", or the integer kernel it turned it into.
    float_runs_as: str = "float"
    #: Whether the figures came from the cache.
    cached: bool = False


@dataclass(frozen=True)
class SpeedDecision:
    """The verdict on one weight layer, with the evidence, for the report."""

    node: str
    op_type: str
    keep_float: bool
    note: str
    timing: LayerTiming | None = None

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"node": self.node, "op_type": self.op_type, "decision": "float" if self.keep_float else "quantized", "note": self.note}
        if self.timing is not None:
            t = self.timing
            row.update(float_ms=round(t.float_ms, 5), quantized_ms=round(t.quantized_ms, 5), slowdown=round(t.slowdown, 3), slowdown_low=round(t.slowdown_low, 3), float_runs_as=t.float_runs_as, cached=t.cached)
        return row


def cache_dir() -> Path:
    """Where measured layer timings are kept: ``$XDG_CACHE_HOME/qcompiler/layer-speed`` (``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "qcompiler" / "layer-speed"


def threads() -> int:
    """Threads onnxruntime's default intra-op pool gets here (the CPUs this process may run on)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cache_key(layer: Layer, target: TargetSpec, weight_dtype: str, cpu: CpuInfo | None = None) -> dict[str, Any]:
    """Everything a layer's timing depends on. Weight values are not in it (kernels' speed does not
    depend on them, so layers of one shape share one measurement), nor a bias: layers are timed
    without one (a bias add is fused into float and integer kernels alike), so `qc target measure
    --per-layer` on the unfolded model fills the cache that compiling it reads."""
    cpu = cpu or detect_cpu()
    return {
        "method": [METHOD_VERSION, COPIES, CYCLES, BLOCK],
        "cpu": cpu.model,
        "flags": sorted(cpu.flags),
        "onnxruntime": ort.__version__,
        "threads": threads(),
        "op": layer.op_type,
        "input_shape": list(layer.input_shape),
        "output_shape": list(layer.output_shape),
        "weight_shape": list(layer.weight.shape),
        "attrs": json.loads(json.dumps(layer.attrs, sort_keys=True, default=str)),
        "weight_dtype": weight_dtype,
        "weights": [target.weights.symmetric, target.weights.granularity, target.weights.block_size],
        "activations": [target.activations.dtype, target.activations.symmetric],
        "bias_quantized": target.bias.quantize,
    }


def _key_file(key: dict[str, Any], directory: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return directory / f"{digest[:32]}.json"


def read_cache(key: dict[str, Any], directory: Path | None = None) -> LayerTiming | None:
    """The timing stored under ``key``; None when absent, unreadable, or stored for another key."""
    path = _key_file(key, directory or cache_dir())
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    try:
        return dataclasses.replace(LayerTiming(**stored["timing"]), cached=True)
    except (KeyError, TypeError):
        return None


def write_cache(key: dict[str, Any], timing: LayerTiming, directory: Path | None = None) -> bool:
    """Store ``timing`` under ``key`` atomically; False (and nothing raised) where the cache is not writable."""
    path = _key_file(key, directory or cache_dir())
    payload = json.dumps({"key": key, "timing": {**dataclasses.asdict(timing), "cached": False}}, indent=1).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as fh:
            fh.write(payload)
        os.replace(fh.name, path)
    except OSError:
        return False
    return True


def _float_between_quantizers(layer: Layer, copies: int, activation_dtype: str) -> onnx.ModelProto:
    """``layer`` in float ``copies`` times side by side, each copy reading the integer input through
    its own DequantizeLinear and writing integers through its own QuantizeLinear, as a float layer
    between quantized neighbours does."""
    elem = IR_TYPES[activation_dtype].value
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    info = np.iinfo(np_dtype)
    zero = (int(info.min) + int(info.max) + 1) // 2
    inits = [numpy_helper.from_array(layer.weight, "w")]
    nodes, outputs = [], []
    for i in range(copies):
        # Scales differ per copy so onnxruntime's common-subexpression elimination cannot merge the
        # copies' dequantizers into one (the network pays one per float layer).
        inits += [
            numpy_helper.from_array(np.array(0.05 * (1 + 1e-3 * i), np.float32), f"x_scale{i}"),
            numpy_helper.from_array(np.array(0.1 * (1 + 1e-3 * i), np.float32), f"y_scale{i}"),
            numpy_helper.from_array(np.array(zero, np_dtype), f"zero{i}"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", ["x", f"x_scale{i}", f"zero{i}"], [f"x{i}"], name=f"dq{i}"),
            helper.make_node(layer.op_type, [f"x{i}", "w"], [f"f{i}"], name=f"{layer.op_type}{i}", **layer.attrs),
            helper.make_node("QuantizeLinear", [f"f{i}", f"y_scale{i}", f"zero{i}"], [f"y{i}"], name=f"q{i}"),
        ]
        outputs.append(helper.make_tensor_value_info(f"y{i}", elem, ["N", *layer.output_shape[1:]]))
    graph = helper.make_graph(nodes, "float_layer", [helper.make_tensor_value_info("x", elem, ["N", *layer.input_shape[1:]])], outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _session(proto: onnx.ModelProto, optimized_path: str | None = None) -> ort.InferenceSession:
    options = session_options(optimize=True)
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def _runs_as(optimized_path: str) -> str:
    kernels = sorted({n.op_type for n in onnx.load(optimized_path, load_external_data=False).graph.node} & INTEGER_KERNELS)
    return kernels[0] if kernels else "float"


_NP = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16, "tensor(int16)": np.int16}


def _bind(session: ort.InferenceSession, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
    """Input and every output bound to buffers allocated once: runs then copy nothing to Python."""
    binding = session.io_binding()
    meta = session.get_inputs()[0]
    dtype = _NP[meta.type]
    x = rng.normal(0, 1, shape).astype(np.float32) if dtype is np.float32 else rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    keep = [ort.OrtValue.ortvalue_from_numpy(x)]
    binding.bind_ortvalue_input(meta.name, keep[0])
    for out in session.get_outputs():
        dims = [shape[0] if not isinstance(d, int) else d for d in out.shape]
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.empty(dims, _NP[out.type])))
        binding.bind_ortvalue_output(out.name, keep[-1])
    return binding, keep


def _block_medians(sessions: list[ort.InferenceSession], shape: tuple[int, ...], rng: np.random.Generator, cycles: int, block: int) -> np.ndarray:
    """[cycle, session] median seconds of each session's timed block, block-interleaved with the
    order rotating each cycle (as `qcompiler.verify.interleaved_latency`)."""
    bound = [_bind(s, shape, rng) for s in sessions]
    slowest = 0.0
    for s, (binding, _) in zip(sessions, bound):
        for _ in range(3):  # first runs allocate buffers and pick kernels
            start = time.perf_counter()
            s.run_with_iobinding(binding)
        slowest = max(slowest, time.perf_counter() - start)
    # A large layer's runs are long enough that timer and scheduler noise matter less: fewer runs
    # per block give the same precision (a 224x224 network's check took 14 s at the full block).
    block = int(np.clip(round(block * BLOCK_RUN_S / max(slowest, 1e-9)), MIN_BLOCK, block))
    medians = np.zeros((cycles, len(sessions)))
    n = len(sessions)
    for cycle in range(cycles):
        for i in [(cycle + j) % n for j in range(n)]:
            s, (binding, _) = sessions[i], bound[i]
            times = []
            for k in range(BLOCK_WARMUP + block):
                start = time.perf_counter()
                s.run_with_iobinding(binding)
                if k >= BLOCK_WARMUP:
                    times.append(time.perf_counter() - start)
            medians[cycle, i] = np.median(times)
    return medians


def measure_layer(layer: Layer, target: TargetSpec, width: int, *, cycles: int = CYCLES, block: int = BLOCK, rng: np.random.Generator | None = None) -> LayerTiming:
    """Time ``layer`` quantized at weight ``width`` as ``target`` compiles it and in float between
    quantizers, on this machine (uncached: see `timed_layer`)."""
    rng = rng or np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="qc-layer-speed-") as tmp:
        optimized = str(Path(tmp) / "float.onnx")
        sessions = [
            _session(_float_between_quantizers(layer, 1, target.activations.dtype), optimized),
            _session(_float_between_quantizers(layer, COPIES, target.activations.dtype)),
            _session(_compiled_at(layer, target, width, rng, 1)),
            _session(_compiled_at(layer, target, width, rng, COPIES)),
        ]
        runs_as = _runs_as(optimized)
    medians = _block_medians(sessions, layer.input_shape, rng, cycles, block) * 1e3
    # Per cycle, the layer's own time in each form: (COPIES copies - 1 copy) / (COPIES - 1).
    per_layer = np.maximum((medians[:, 1::2] - medians[:, 0::2]) / (COPIES - 1), 1e-6)
    ratios = per_layer[:, 1] / per_layer[:, 0]
    return LayerTiming(
        float_ms=float(np.median(per_layer[:, 0])),
        quantized_ms=float(np.median(per_layer[:, 1])),
        slowdown=float(np.median(ratios)),
        slowdown_low=float(np.percentile(ratios, 25)),
        float_runs_as=runs_as,
    )


Measure = Callable[[Layer, TargetSpec, int], LayerTiming]


def timed_layer(layer: Layer, target: TargetSpec, width: int, weight_dtype: str, *, measure: Measure | None = None, directory: Path | None = None, refresh: bool = False) -> LayerTiming:
    """`measure_layer` through the disk cache: measured once per key, read back after
    (``refresh``: measured again, and the cache updated)."""
    key = cache_key(layer, target, weight_dtype)
    cached = None if refresh else read_cache(key, directory)
    if cached is not None:
        return cached
    timing = (measure or measure_layer)(layer, target, width)
    write_cache(key, timing, directory)
    return timing


def cpu_label(cpu: CpuInfo | None = None) -> str:
    """The CPU as a note names it: "AMD EPYC (avx512-vnni)"."""
    cpu = cpu or detect_cpu()
    return f"{cpu.model} ({cpu.isa})"


def decide(timing: LayerTiming, rules: SpeedRules, cpu: str, weight_dtype: str = "int8") -> tuple[bool, str]:
    """(keep float, the report's note). Float only when the quantized form is slower than float
    with its boundary by more than both margins, in most timing cycles, and onnxruntime really
    runs the float form in float."""
    measured = f"measured {timing.quantized_ms:.3f} vs {timing.float_ms:.3f} ms (float with its DequantizeLinear/QuantizeLinear)"
    if timing.float_runs_as != "float":
        return False, (
            f"quantized: onnxruntime {ort.__version__} runs this layer left float between quantizers as its own {timing.float_runs_as} "
            f"(per-tensor weights), so float is not on offer on {cpu}; {measured}"
        )
    slower = timing.quantized_ms - timing.float_ms
    if timing.slowdown > rules.min_slowdown and slower > rules.min_difference_ms and timing.slowdown_low > 1.0:
        return True, f"left float: {weight_dtype} kernel {timing.slowdown:.2f}x slower than float on {cpu}, {measured}"
    if timing.slowdown >= 1.0:
        return False, f"quantized: {weight_dtype} kernel {timing.slowdown:.2f}x the float time on {cpu}, within the margins ({rules.min_slowdown:g}x, {rules.min_difference_ms:g} ms, most cycles); {measured}"
    return False, f"quantized: {weight_dtype} kernel {1 / timing.slowdown:.2f}x faster than float on {cpu}; {measured}"


def skip_reason(target: TargetSpec, cpu: CpuInfo | None = None) -> str | None:
    """Why layers cannot be timed for ``target`` here: it is compiled for another CPU (``--cpu``),
    or its activations stay float (no quantizer boundary to weigh). None when they can."""
    cpu = cpu or detect_cpu()
    if not target.activations.quantize:
        return "weight-only target: layers have no quantizer boundary to weigh"
    if target.machine is not None and target.machine.cpu != cpu.summary():
        return f"compiling for {target.machine.cpu}, not this machine ({cpu_label(cpu)}): layers are timed only on the CPU the model will run on"
    return None


#: Layers with a larger float weight are not timed (a model over 2 GB has weights of hundreds of
#: MB; timing builds several models around the weight).
MAX_TIMED_WEIGHT_BYTES = 64 * 2**20


def weight_bytes(node: ir.Node) -> int:
    """Bytes of ``node``'s constant weight as stored (0 without one); reads no data."""
    index = input_roles(node).weight
    value = node.inputs[index] if index is not None and index < len(node.inputs) else None
    return value.const_value.nbytes if value is not None and value.const_value is not None else 0


def check_layers(nodes: Iterable[tuple[ir.Node, int, str]], target: TargetSpec, *, measure: Measure | None = None, directory: Path | None = None, progress: ProgressFactory = null_progress) -> tuple[list[SpeedDecision], dict[str, Any]]:
    """Decide each (node, weight width, weight dtype): quantized or float. Also returns the
    summary for the report (CPU, onnxruntime, seconds spent measuring, cache hits)."""
    start = time.perf_counter()
    label = cpu_label()
    decisions, hits, measured = [], 0, 0
    nodes = list(nodes)
    with progress("timing layers", len(nodes)) as bar:
        for node, width, dtype in nodes:
            bar.advance()
            weight = weight_bytes(node)
            if weight > MAX_TIMED_WEIGHT_BYTES:
                decisions.append(SpeedDecision(node.name, node.op_type, False, f"quantized: not timed (a {weight / 2**20:.0f} MiB weight: its timing models would hold it several times over; at this size the integer kernel moves a quarter of the float weight's bytes)"))
                continue
            layer = layer_of(node)
            if layer is None:
                decisions.append(SpeedDecision(node.name, node.op_type, False, "quantized: not timed (no constant weight, or shapes not static)"))
                continue
            timing = timed_layer(layer, target, width, dtype, measure=measure, directory=directory)
            if not timing.cached:
                # The layer's timing models hold its weights inside IR reference cycles: free
                # them before the next layer (a model over 2 GB has layers of hundreds of MB).
                gc.collect()
            hits += timing.cached
            measured += not timing.cached
            keep, note = decide(timing, target.speed, label, dtype)
            decisions.append(SpeedDecision(node.name, node.op_type, keep, note, timing))
    summary = {"cpu": label, "onnxruntime": ort.__version__, "threads": threads(), "layers_timed": measured, "cache_hits": hits, "seconds": round(time.perf_counter() - start, 3), "cache": str(directory or cache_dir())}
    return decisions, summary
