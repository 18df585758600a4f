"""`qc target measure`: what each op costs per weight dtype on this machine, as a target file.

A target's ``[cost]`` table drives latency budgets (``assign-precision{budget=latency=...}``). Its
figures depend on the machine and the runtime, so this measures them: for every op type the target
quantizes (that has a weight), single-layer models run in onnxruntime in float and as the target
compiles them at each native weight width, timed with the verifier's interleaved timing, same
session options. Each variant runs once and eight times side by side on the same input; the
difference is the layer's own time, free of what a session run costs besides its kernels. A QDQ
layer reads and writes integers, as between quantized neighbours. The cost of a dtype is its time
over the float layer's. The layers are either
representative shapes (a 3x3 Conv, a transformer-sized MatMul and Gemm) or, with ``model``, the
weight layers of a real model, each cut out with its own shapes, so the table describes that model.

The result is written as a target file that ``extends`` the measured one and only sets ``[cost]``:
pass it back with ``--target`` to use the figures.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from qcompiler.cost_model import node_macs, storage_dtype
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.ir import annotate_types, to_proto
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import ProgressFactory, null_progress
from qcompiler.runtime import make_session
from qcompiler.targets.spec import TargetSpec
from qcompiler.verify import interleaved_latency

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
#: Side-by-side copies of a layer in its second timed model (see `measure`).
COPIES = 8


@dataclass
class Layer:
    """One weight layer to time: its op, shapes (batch 1), float weight and attributes."""

    op_type: str
    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight: np.ndarray
    attrs: dict
    macs: int

    def model(self, copies: int = 1) -> ir.Model:
        """A model running the layer ``copies`` times side by side on one input."""
        return _single_op(self.op_type, self.name or self.op_type, self.input_shape, self.weight, self.attrs, self.output_shape, copies)


@dataclass
class CostTable:
    """Measured cost per MAC relative to float32, per op type and per dtype, with the evidence."""

    target: str
    source: str
    op: dict[str, dict[str, float]] = field(default_factory=dict)
    #: op type -> dtype -> (float ms, quantized ms) summed over that op's layers
    timings: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    @property
    def mac(self) -> dict[str, float]:
        """One figure per dtype for ops without their own line: the median over op types."""
        dtypes = sorted({d for table in self.op.values() for d in table})
        return {"float32": 1.0, **{d: float(np.median([t[d] for t in self.op.values() if d in t])) for d in dtypes if d != "float32"}}

    def to_toml(self, extends: str) -> str:
        lines = [
            f"# Measured by `qc target measure` ({self.source}).",
            "# Each figure: the op's latency with weights of that dtype over its float latency.",
            f'extends = "{extends}"',
            f'name = "{self.target}-measured"',
            "",
            "[cost]",
            f'source = "{self.source}"',
            "",
            "[cost.mac]",
            *(f'"{k}" = {v:.4g}' for k, v in self.mac.items()),
        ]
        for op_type, table in self.op.items():
            lines += ["", f"[cost.op.{op_type}]", *(f'"{k}" = {v:.4g}' for k, v in table.items())]
        return "\n".join(lines) + "\n"


def _single_op(op_type: str, name: str, x_shape: tuple[int, ...], w: np.ndarray, attrs: dict, y_shape: tuple[int, ...], copies: int = 1) -> ir.Model:
    nodes = [helper.make_node(op_type, ["x", "w"], [f"y{i}"], name=f"{name}_{i}", **attrs) for i in range(copies)]
    # The first axis is symbolic so calibration may use any number of samples; the feed that is
    # timed has the layer's own shape.
    x_dims, y_dims = ["N", *x_shape[1:]], ["N", *y_shape[1:]]
    outputs = [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, y_dims) for i in range(copies)]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_dims)], outputs, initializer=[numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    annotate_types(model)
    return model


def representative_layers(rng: np.random.Generator | None = None) -> list[Layer]:
    """A 3x3 Conv of a small CNN's middle stage and a transformer block's MatMul and Gemm."""
    rng = rng or np.random.default_rng(0)
    conv = rng.normal(0, 0.05, (64, 64, 3, 3)).astype(np.float32)
    dense = rng.normal(0, 0.05, (768, 768)).astype(np.float32)
    return [
        Layer("Conv", "conv3x3", (1, 64, 32, 32), (1, 64, 32, 32), conv, {"pads": [1, 1, 1, 1]}, 64 * 32 * 32 * 64 * 9),
        Layer("MatMul", "matmul768", (1, 128, 768), (1, 128, 768), dense, {}, 128 * 768 * 768),
        Layer("Gemm", "gemm768", (128, 768), (128, 768), dense, {"transB": 1}, 128 * 768 * 768),
    ]


def model_layers(model: ir.Model) -> list[Layer]:
    """Every Conv/Gemm/MatMul of ``model`` with a constant weight and static shapes, cut out as its
    own single-op model (batch 1)."""
    annotate_types(model)
    layers = [layer for node in model.graph if (layer := layer_of(node)) is not None]
    if not layers:
        raise QCError("no Conv/Gemm/MatMul with a constant weight and static shapes to measure", option="--model")
    return layers


def layer_of(node: ir.Node) -> Layer | None:
    """``node`` cut out as a `Layer` (batch 1, without its bias): None unless it is a
    Conv/Gemm/MatMul with a constant weight and static shapes past the batch axis."""
    if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
        return None
    roles = input_roles(node)
    if roles.weight is None or roles.weight >= len(node.inputs) or node.inputs[roles.weight] is None or node.inputs[roles.weight].const_value is None:
        return None
    x, y = node.inputs[0], node.outputs[0]
    w = node.inputs[roles.weight].const_value.numpy().astype(np.float32)
    dims = [list(v.shape) if v is not None and v.shape is not None else None for v in (x, y)]
    if node.op_type == "Gemm" and w.ndim == 2 and not node.attributes.get_int("transA", 0):
        # A Gemm's input is [batch, K] with K read off its weight (shape inference often loses it
        # behind a Reshape or Flatten of computed shape).
        dims[0] = [None, int(w.shape[1] if node.attributes.get_int("transB", 0) else w.shape[0])]
    if any(d is None or not all(isinstance(s, int) for s in d[1:]) for d in dims):
        return None
    x_shape, y_shape = (1, *dims[0][1:]), (1, *dims[1][1:])
    attrs = {k: a.value for k, a in node.attributes.items()}
    return Layer(node.op_type, node.name, x_shape, y_shape, w, attrs, node_macs(node, w.shape))


def _compiled_at(layer: Layer, target: TargetSpec, width: int, rng: np.random.Generator, copies: int = 1) -> onnx.ModelProto:
    """``layer`` (``copies`` side by side) as ``target`` compiles it with every weight at ``width``."""
    from qcompiler.compiler import compile as compile_model

    # The output quantized too: inside a network the next layer's quantizer follows, and
    # onnxruntime fuses DQ -> op -> Q into one integer kernel only with it.
    # The layer speed check (which calls this) must not time the one-layer model again.
    spec = dataclasses.replace(
        target,
        bits=dataclasses.replace(target.bits, default=width),
        ops=dataclasses.replace(target.ops, quantize_graph_outputs=True),
        speed=dataclasses.replace(target.speed, keep_slower_float=False),
    )
    # Bias correction only shifts biases; it costs a calibration pass and changes no timing.
    pipeline = "calibrate,insert-qdq{bias-correction=false}" if target.activations.quantize else "insert-qdq{bias-correction=false}"
    data = DataSource({"x": rng.normal(0, 1, (8, *layer.input_shape[1:])).astype(np.float32)})
    result = compile_model(layer.model(copies), spec, calibration=data, pipeline=pipeline, verify=False)
    return to_proto(_integer_boundaries(result.model))


def _integer_boundaries(model: ir.Model) -> ir.Model:
    """Drop the QuantizeLinear on the input and the DequantizeLinear on the output: the layer then
    reads and writes integers, as it does between two quantized layers, and the timing holds only
    its own kernel (a network quantizes its input once, not at every layer)."""
    graph = model.graph
    x = graph.inputs[0]
    q = next((u.node for u in x.uses() if u.node.op_type == "QuantizeLinear"), None)
    if q is not None and len(x.uses()) == 1:
        integer_in = ir.Value(name="x_quantized", type=ir.TensorType(q.outputs[0].dtype), shape=x.shape)
        q.outputs[0].replace_all_uses_with(integer_in)
        graph.inputs[0] = integer_in
        graph.remove(q, safe=True)
    for i, y in enumerate(list(graph.outputs)):
        dq = y.producer()
        if dq is not None and dq.op_type == "DequantizeLinear":
            graph.outputs[i] = dq.inputs[0]
            graph.remove(dq, safe=True)
    return model


def measure(target: TargetSpec, layers: list[Layer] | None = None, *, runs: int = 300, block: int = 10, progress: ProgressFactory = null_progress) -> CostTable:
    """Time each layer in float and at each of the target's native weight widths."""
    layers = layers or representative_layers()
    ops = [l for l in layers if l.op_type in target.ops.quantized]
    if not ops:
        raise QCError(f"target '{target.name}' quantizes none of {sorted({l.op_type for l in layers})}: nothing to measure", option="--target")
    widths = sorted(target.bits.native)
    dtypes = [storage_dtype(target, b) for b in widths]
    rng = np.random.default_rng(0)
    sums: dict[str, dict[str, list[float]]] = {}
    with progress("measuring layers", len(ops)) as bar:
        for layer in ops:
            # Each variant once and COPIES times side by side: the difference over COPIES - 1 is
            # the layer's own time, without what a session run costs besides its kernels
            # (binding inputs, waking the thread pool), which a network pays once, not per layer.
            protos = [to_proto(layer.model(1)), to_proto(layer.model(COPIES))]
            for b in widths:
                protos += [_compiled_at(layer, target, b, rng, 1), _compiled_at(layer, target, b, rng, COPIES)]
            sessions = [make_session(p, optimize=True, what=f"{layer.name} layer") for p in protos]
            ms = _time(sessions, layer.input_shape, rng, cycles=max(1, runs // block), block=block)
            per_layer = [max((many - one) / (COPIES - 1), 1e-6) for one, many in zip(ms[::2], ms[1::2])]
            table = sums.setdefault(layer.op_type, {d: [0.0, 0.0] for d in dtypes})
            for dtype, t in zip(dtypes, per_layer[1:]):
                table[dtype][0] += per_layer[0]
                table[dtype][1] += t
            bar.advance()
    date = datetime.date.today().isoformat()
    source = f"qc target measure {target.name}: {len(ops)} layers, onnxruntime {ort.__version__}, {platform.machine()} {platform.processor() or ''} x{_cores()}, {date}".replace("  ", " ")
    result = CostTable(target=target.name, source=source)
    for op_type, table in sums.items():
        result.op[op_type] = {"float32": 1.0, **{d: t[1] / t[0] for d, t in table.items()}}
        result.timings[op_type] = {d: (t[0], t[1]) for d, t in table.items()}
    return result


_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16, "tensor(int16)": np.int16}


def _time(sessions: list[ort.InferenceSession], shape: tuple[int, ...], rng: np.random.Generator, *, cycles: int, block: int) -> list[float]:
    """Median ms of each session, block-interleaved; each gets its own input of the layer's
    shape (float, or integers where the quantizer on the input was dropped)."""
    feeds = []
    for session in sessions:
        meta = session.get_inputs()[0]
        dtype = _NP_OF_ORT.get(meta.type)
        if dtype is None:
            raise QCError(f"cannot time an input of type {meta.type}")
        value = rng.normal(0, 1, shape).astype(np.float32) if dtype is np.float32 else rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
        feeds.append({meta.name: value})
    ms, _ = interleaved_latency(sessions, {}, cycles=cycles, block=block, feeds=feeds)
    return ms


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def iter_rows(table: CostTable) -> Iterator[tuple[str, str, float, float, float]]:
    """(op, dtype, float ms, quantized ms, cost) rows for printing."""
    for op_type, timings in table.timings.items():
        for dtype, (f_ms, q_ms) in timings.items():
            yield op_type, dtype, f_ms, q_ms, table.op[op_type][dtype]
