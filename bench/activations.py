"""Activations other than Relu/Clip between integer kernels on onnxruntime's CPU provider: which
form is faster and more accurate, measured on the model onnxruntime runs (ORT_ENABLE_ALL).

    python bench/activations.py                      # every network; a few minutes on 2 cores
    python bench/activations.py --quick              # smoke check: small inputs, few timing runs
    python bench/activations.py --nets chain-sigmoid,mbv3-hardsigmoid --json /tmp/act.json

Networks (seeded random weights, BN statistics measured on random inputs so every activation sees
inputs of unit scale, as trained networks' do):
- ``chain-<act>``: Conv-BN-act x4 (one stride 2), global average pool, Gemm, for Sigmoid,
  HardSigmoid, HardSwish, SiLU (``Mul(x, Sigmoid(x))``, as torch exports it), LeakyRelu(0.1), Tanh,
  Gelu (the opset-20 op), Gelu-erf (``x * 0.5 * (1 + Erf(x / sqrt 2))``, the older export), Softplus, Elu.
- ``mbv3-<gate>``: a MobileNetV3 block: HardSwish stem, 1x1 expand + HardSwish, depthwise 3x3 +
  HardSwish, squeeze-excitation (GlobalAveragePool, 1x1 + Relu, 1x1, gate, ``Mul``), 1x1 project,
  residual Add; the gate is HardSigmoid or Sigmoid.

Alternatives, each compiled by qc (``qcompiler.compile``, what ``qc compile`` runs) from a target file
that extends ort-cpu (written next to the results so every row's command can be rerun):
- ``float-act``: the activation not listed in ``[ops] quantized``: qc leaves it float; its quantized
  neighbours put a QuantizeLinear before and after it (``DQ -> act -> Q``, onnxruntime fuses what it can).
- ``quantized``: the activation's op types listed in ``[ops] quantized``.
- ``float-mul`` (networks whose activation or gate contains Mul/Add): those not quantized either, so
  the whole activation subgraph runs float between the layers' quantizers.
- ``mul-quantized`` (Gelu-erf): the Mul and Add inside the decomposed Gelu quantized one by one
  (what qc did before ort-cpu's ``[ops.kept_float] Gelu``); ``quantized`` also quantizes its Erf.
- ``lut``: ``float-act`` with each ``DQ -> act -> Q`` replaced by an exact 256-entry table lookup
  (``Cast`` to int32, ``Gather``): the integer form onnxruntime can run for any unary op.
- ``ort-cpu``: the built-in target as decided (targets/ort-cpu.toml).

Per row: output SQNR against the float model on held-out random inputs (another seed than the
calibration's), batch-1 latency block-interleaved with the float model and every alternative of the
same network (speedups are medians of per-cycle paired ratios), and the op types onnxruntime ran
(its optimized graph, saved with ``SessionOptions.optimized_model_filepath``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.cpu import ISAS, detect_cpu
from qcompiler.ir import NameAuthority, add_initializer, constant_array, to_proto
from qcompiler.quant.uniform import sqnr_db
from qcompiler.runtime import session_options
from qcompiler.verify import interleaved_latency

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "activations"
OPSET = 20  # Gelu is an ONNX op from opset 20
CALIB_SEED, EVAL_SEED, WEIGHT_SEED = 1, 2, 0
#: ort-cpu's integer ops without any activation: the baseline every alternative adds to.
BASE_QUANTIZED = ["Conv", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat"]
#: onnxruntime's ops a table lookup replaces exactly (one float input, one float output).
UNARY = {"Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Gelu", "Softplus", "Elu", "Erf"}


# --------------------------------------------------------------------------------------------
# Activations as ONNX nodes: each returns (nodes, initializers) computing out = act(x).
def _unary(op: str, **attrs):
    def make(x: str, out: str, p: str):
        return [helper.make_node(op, [x], [out], name=f"{p}_{op.lower()}", **attrs)], {}

    return make


def _silu(x: str, out: str, p: str):
    return [helper.make_node("Sigmoid", [x], [f"{p}_sig"], name=f"{p}_sigmoid"), helper.make_node("Mul", [x, f"{p}_sig"], [out], name=f"{p}_mul")], {}


def _gelu_erf(x: str, out: str, p: str):
    nodes = [
        helper.make_node("Div", [x, f"{p}_sqrt2"], [f"{p}_d"], name=f"{p}_div"),
        helper.make_node("Erf", [f"{p}_d"], [f"{p}_e"], name=f"{p}_erf"),
        helper.make_node("Add", [f"{p}_e", f"{p}_one"], [f"{p}_a"], name=f"{p}_add"),
        helper.make_node("Mul", [x, f"{p}_a"], [f"{p}_m"], name=f"{p}_mul"),
        helper.make_node("Mul", [f"{p}_m", f"{p}_half"], [out], name=f"{p}_mul_half"),
    ]
    return nodes, {f"{p}_sqrt2": np.float32(math.sqrt(2)), f"{p}_one": np.float32(1.0), f"{p}_half": np.float32(0.5)}


ACTIVATIONS = {
    "sigmoid": _unary("Sigmoid"),
    "hardsigmoid": _unary("HardSigmoid", alpha=1 / 6, beta=0.5),  # torch's constants
    "hardswish": _unary("HardSwish"),
    "silu": _silu,
    "leakyrelu": _unary("LeakyRelu", alpha=0.1),
    "tanh": _unary("Tanh"),
    "gelu": _unary("Gelu"),
    "gelu-erf": _gelu_erf,
    "softplus": _unary("Softplus"),
    "elu": _unary("Elu"),
}
#: Op types of each activation subgraph (what ``quantized`` adds to the target).
ACT_OPS = {"silu": ["Sigmoid"], "mbv3-hardsigmoid": ["HardSwish", "HardSigmoid"], "mbv3-sigmoid": ["HardSwish", "Sigmoid"]}
NETS = [f"chain-{a}" for a in ACTIVATIONS] + ["mbv3-hardsigmoid", "mbv3-sigmoid"]
#: Networks where Mul/Add sit inside an activation (SiLU, Gelu-erf) or the SE gate.
HAS_MUL = {"chain-silu", "chain-gelu-erf", "mbv3-hardsigmoid", "mbv3-sigmoid"}


class _Builder:
    """Collects nodes and seeded, sensibly scaled weights (Kaiming normal, BN placeholders)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.bns: list[str] = []  # BN names, in graph order (their statistics are set later)

    def conv_bn(self, x: str, cin: int, cout: int, k: int, name: str, stride: int = 1, group: int = 1) -> str:
        fan_in = cin // group * k * k
        self.inits[f"{name}_w"] = self.rng.normal(0, math.sqrt(2.0 / fan_in), (cout, cin // group, k, k)).astype(np.float32)
        self.nodes.append(helper.make_node("Conv", [x, f"{name}_w"], [f"{name}_c"], name=name, pads=[k // 2] * 4, strides=[stride] * 2, group=group))
        self.inits[f"{name}_gamma"] = self.rng.uniform(0.5, 1.5, cout).astype(np.float32)
        self.inits[f"{name}_beta"] = self.rng.normal(0, 0.5, cout).astype(np.float32)
        self.inits[f"{name}_mean"] = np.zeros(cout, np.float32)
        self.inits[f"{name}_var"] = np.ones(cout, np.float32)
        self.nodes.append(helper.make_node("BatchNormalization", [f"{name}_c", f"{name}_gamma", f"{name}_beta", f"{name}_mean", f"{name}_var"], [f"{name}_bn"], name=f"{name}_bnorm"))
        self.bns.append(name)
        return f"{name}_bn"

    def conv(self, x: str, cin: int, cout: int, name: str) -> str:
        """1x1 Conv with bias (the SE block's)."""
        self.inits[f"{name}_w"] = self.rng.normal(0, math.sqrt(2.0 / cin), (cout, cin, 1, 1)).astype(np.float32)
        self.inits[f"{name}_b"] = self.rng.normal(0, 0.5, cout).astype(np.float32)
        self.nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], name=name))
        return f"{name}_c"

    def act(self, kind: str, x: str, name: str) -> str:
        nodes, inits = ACTIVATIONS[kind](x, f"{name}_out", name)
        self.nodes.extend(nodes)
        self.inits.update(inits)
        return f"{name}_out"

    def head(self, x: str, channels: int) -> None:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="gap"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"))
        self.inits["fc_w"] = self.rng.normal(0, 1 / math.sqrt(channels), (10, channels)).astype(np.float32)
        self.inits["fc_b"] = np.zeros(10, np.float32)
        self.nodes.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], name="fc", transB=1))

    def model(self, resolution: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "act_bench", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, resolution, resolution])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
                                  initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in self.inits.items()])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        proto.ir_version = 9
        return proto


def build(net: str, resolution: int, width: int, stats_inputs: np.ndarray) -> onnx.ModelProto:
    """The float network ``net`` with BN statistics measured layer by layer on ``stats_inputs``."""
    b = _Builder(WEIGHT_SEED)
    if net.startswith("chain-"):
        kind = net.removeprefix("chain-")
        x = b.act(kind, b.conv_bn("input", 3, width, 3, "l0"), "a0")
        x = b.act(kind, b.conv_bn(x, width, 2 * width, 3, "l1", stride=2), "a1")
        x = b.act(kind, b.conv_bn(x, 2 * width, 2 * width, 3, "l2"), "a2")
        x = b.act(kind, b.conv_bn(x, 2 * width, 2 * width, 1, "l3"), "a3")
        b.head(x, 2 * width)
    else:
        gate = net.removeprefix("mbv3-")
        c, e = width, 4 * width
        stem = b.act("hardswish", b.conv_bn("input", 3, c, 3, "stem", stride=2), "stem_act")
        x = b.act("hardswish", b.conv_bn(stem, c, e, 1, "expand"), "expand_act")
        x = b.act("hardswish", b.conv_bn(x, e, e, 3, "dw", group=e), "dw_act")
        b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["se_pool"], name="se_gap"))
        s = b.conv("se_pool", e, e // 4, "se_reduce")
        b.nodes.append(helper.make_node("Relu", [s], ["se_relu"], name="se_relu"))
        s = b.act(gate, b.conv("se_relu", e // 4, e, "se_expand"), "se_gate")
        b.nodes.append(helper.make_node("Mul", [x, s], ["se_out"], name="se_mul"))
        x = b.conv_bn("se_out", e, c, 1, "project")
        b.nodes.append(helper.make_node("Add", [x, stem], ["res"], name="residual"))
        x = b.act("hardswish", b.conv_bn("res", c, e, 1, "last"), "last_act")
        b.head(x, e)
    proto = b.model(stats_inputs.shape[-1])
    # Each BN normalises what its Conv actually produces given the BNs before it: set in order.
    for name in b.bns:
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        probe.graph.output.append(helper.make_tensor_value_info(f"{name}_c", TensorProto.FLOAT, None))
        conv_out = _session(probe).run([f"{name}_c"], {"input": stats_inputs})[0]
        for init in proto.graph.initializer:
            if init.name in (f"{name}_mean", f"{name}_var"):
                stat = conv_out.mean(axis=(0, 2, 3)) if init.name.endswith("_mean") else conv_out.var(axis=(0, 2, 3)) + 1e-5
                init.CopyFrom(numpy_helper.from_array(stat.astype(np.float32), init.name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _session(model: onnx.ModelProto, optimized_path: Path | None = None) -> ort.InferenceSession:
    options = session_options(optimize=True)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# The table-lookup alternative
def lookup_tables(model: ir.Model) -> int:
    """Replace each ``DequantizeLinear -> unary -> QuantizeLinear`` (per-tensor uint8) by
    ``Cast(int32) -> Gather(table)``: the table is onnxruntime's own DQ -> op -> Q on all 256
    inputs, so the result is bit-identical. Returns how many were replaced."""
    names = NameAuthority(model.graph)
    replaced = 0
    for node in list(model.graph):
        if node.op_type not in UNARY or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        dq, consumers = node.inputs[0].producer(), node.outputs[0].consumers()
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear" or node.outputs[0].is_graph_output():
            continue
        q = consumers[0]
        params = [constant_array(v) for v in (*dq.inputs[1:3], *q.inputs[1:3])]
        if any(p is None or np.size(p) != 1 for p in params) or params[1].dtype != np.uint8 or params[3].dtype != np.uint8:
            continue
        table = _table(node, *params)
        t = add_initializer(model.graph, names, f"{node.name}_table", table)
        cast = ir.Node("", "Cast", [dq.inputs[0]], attributes={"to": ir.Attr("to", ir.AttributeType.INT, TensorProto.INT32)}, name=names.fresh(f"{node.name}_cast"))
        gather = ir.Node("", "Gather", [t, cast.outputs[0]], attributes={"axis": ir.Attr("axis", ir.AttributeType.INT, 0)}, name=names.fresh(f"{node.name}_lookup"))
        cast.outputs[0].name, gather.outputs[0].name = names.fresh(f"{node.name}_index"), names.fresh(f"{node.name}_looked_up")
        gather.outputs[0].dtype, gather.outputs[0].shape = ir.DataType.UINT8, q.outputs[0].shape
        model.graph.insert_before(node, [cast, gather])
        q.outputs[0].replace_all_uses_with(gather.outputs[0], replace_graph_outputs=True)
        for dead in (q, node):
            model.graph.remove(dead, safe=True)
        if not dq.outputs[0].uses():
            model.graph.remove(dq, safe=True)
        replaced += 1
    model.graph.sort()
    return replaced


def _table(node: ir.Node, s_in, z_in, s_out, z_out) -> np.ndarray:
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s_in", "z_in"], ["x"]), helper.make_node(node.op_type, ["x"], ["y"], **attrs), helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["out"])]
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in (("s_in", s_in), ("z_in", z_in), ("s_out", s_out), ("z_out", z_out))]
    graph = helper.make_graph(nodes, "table", [helper.make_tensor_value_info("q", TensorProto.UINT8, [256])], [helper.make_tensor_value_info("out", TensorProto.UINT8, [256])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 9
    return _session(proto).run(None, {"q": np.arange(256, dtype=np.uint8)})[0]


# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    net: str
    alternative: str
    command: str
    sqnr_db: float | None = None
    ms: float | None = None
    speedup: float | None = None  # vs the float model, median of per-cycle paired ratios
    vs_float_act: float | None = None  # vs the float-act alternative (>1: faster)
    ran: dict[str, int] = field(default_factory=dict)  # op types in onnxruntime's optimized graph
    float_notes: list[str] = field(default_factory=list)  # qc's report: nodes kept float and why


def alternatives(net: str) -> dict[str, list[str] | None]:
    """Alternative -> the target's ``[ops] quantized`` (None: the built-in ort-cpu as decided)."""
    act_ops = ACT_OPS.get(net.removeprefix("chain-"), ACT_OPS.get(net))
    if act_ops is None:
        op = ACTIVATIONS[net.removeprefix("chain-")]("x", "y", "p")[0][0].op_type
        act_ops = [op]
    alts: dict[str, list[str] | None] = {"float-act": BASE_QUANTIZED, "quantized": BASE_QUANTIZED + act_ops}
    if net == "chain-gelu-erf":
        # "Gelu" in `quantized` turns off ort-cpu's keeping the decomposed Gelu float: its Mul and
        # Add are then quantized one by one, as qc did before bench/activations.py measured it.
        alts["quantized"] = BASE_QUANTIZED + ["Gelu", "Erf"]
        alts["mul-quantized"] = BASE_QUANTIZED + ["Gelu"]
    if net in HAS_MUL:
        # Chains have no other Mul/Add; the MobileNet block keeps its residual Add quantized.
        alts["float-mul"] = [op for op in BASE_QUANTIZED if op not in ("Mul", "Add" if net.startswith("chain-") else "Mul")]
    if not net.startswith("mbv3") and net not in HAS_MUL:
        alts["lut"] = BASE_QUANTIZED
    alts["ort-cpu"] = None
    return alts


def _target_file(folder: Path, alt: str, quantized: list[str] | None) -> str:
    if quantized is None:
        return "ort-cpu"
    path = folder / f"target-{alt}-{'-'.join(quantized[len(BASE_QUANTIZED):]) or 'base'}.toml"
    path.write_text(f'extends = "ort-cpu"\nname = "ort-cpu-{alt}"\n[ops]\nquantized = {json.dumps(quantized)}\n')
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def measure_net(net: str, args: argparse.Namespace, folder: Path) -> list[Row]:
    r = args.resolution
    calib = np.random.default_rng(CALIB_SEED).standard_normal((args.calib_count, 3, r, r)).astype(np.float32)
    held_out = np.random.default_rng(EVAL_SEED).standard_normal((args.eval_count, 3, r, r)).astype(np.float32)
    float_proto = build(net, r, args.width, calib)
    model_path, calib_path = folder / f"{net}.onnx", folder / f"{net}_calib.npz"
    onnx.save(float_proto, model_path)
    np.savez(calib_path, input=calib)
    rel = lambda p: str(Path(p).relative_to(REPO)) if Path(p).is_relative_to(REPO) else str(p)  # noqa: E731
    reference = _session(float_proto).run(None, {"input": held_out})[0]
    rows = [Row(net, "float", f"python bench/activations.py --nets {net}  (the float model {rel(model_path)})")]
    protos = [float_proto]
    for alt, quantized in alternatives(net).items():
        target = _target_file(folder, alt, quantized)
        out = folder / f"{net}-{alt}"
        command = f"qc compile {rel(model_path)} --target {target} --calib {rel(calib_path)} -o {rel(out)} --no-verify --min-sqnr 0 --force"
        # The same call `qc compile` makes with those options.
        result = qcompiler.compile(str(model_path), target=target if quantized is None else str(REPO / target), calibration=str(calib_path), verify=False, output_dir=out, force=True, min_sqnr=None)
        model = result.model
        if alt == "lut":
            replaced = lookup_tables(model)
            command += f"; then lookup_tables() of bench/activations.py ({replaced} lookups)"
        proto = to_proto(model)
        notes = sorted({f"{k.op_type}: {k.reason}" for k in result.report.kept_float})
        rows.append(Row(net, alt, command, float_notes=notes))
        protos.append(proto)
    for row, proto in zip(rows, protos):
        opt_path = folder / f"{net}-{row.alternative}.optimized.onnx"
        session = _session(proto, opt_path)
        row.sqnr_db = None if row.alternative == "float" else round(sqnr_db(reference, session.run(None, {"input": held_out})[0]), 2)
        optimized = onnx.load(opt_path)
        row.ran = dict(sorted(Counter(f"{n.domain + '.' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}" for n in optimized.graph.node).items()))
    sessions = [_session(p) for p in protos]
    ms, speedups = interleaved_latency(sessions, {"input": held_out[:1]}, cycles=args.cycles, block=args.block)
    base = speedups[1]  # float-act
    for row, m, s in zip(rows, ms, speedups):
        row.ms, row.speedup, row.vs_float_act = round(m, 4), round(s, 3), round(s / base, 3)
    return rows


def machine() -> dict:
    cpu = detect_cpu()
    return {"cpu_summary": cpu.summary(), "isa": cpu.isa, "isa_description": ISAS.get(cpu.isa, ""), "cpus": os.cpu_count(), "onnxruntime": ort.__version__, "python": sys.version.split()[0]}


def _ran_short(ran: dict[str, int]) -> str:
    """The op types that say how the activation ran (layout and Q/DQ bookkeeping left out)."""
    skip = {"Transpose", "Flatten", "Reshape", "com.microsoft.ReorderInput", "com.microsoft.ReorderOutput"}
    return " ".join(f"{op}x{n}" for op, n in ran.items() if op not in skip)


def print_table(rows: list[Row], m: dict, argv: list[str]) -> None:
    print(f"CPU: {m['cpu_summary']}; {m['cpus']} CPUs")
    print(f"ISA {m['isa']}: {m['isa_description']}; onnxruntime {m['onnxruntime']}, Python {m['python']}")
    print(f"bench: python bench/activations.py {' '.join(argv)}")
    print(f"{'network':<18} {'alternative':<10} {'SQNR dB':>8} {'ms':>8} {'vs fp32':>8} {'vs float-act':>12}  onnxruntime ran")
    for r in rows:
        sq = "" if r.sqnr_db is None else f"{r.sqnr_db:8.2f}"
        print(f"{r.net:<18} {r.alternative:<10} {sq:>8} {r.ms:8.3f} {r.speedup:7.2f}x {r.vs_float_act:11.2f}x  {_ran_short(r.ran)}")
        print(f"{'':<30}$ {r.command}")
        if r.alternative == "ort-cpu":
            for note in r.float_notes:  # why qc left nodes float, as its report says
                print(f"{'':<30}report: {note}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16x16 inputs, width 8, few samples and timing runs")
    parser.add_argument("--nets", default=",".join(NETS), help=f"comma-separated, of: {', '.join(NETS)}")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="channels of the first layer")
    parser.add_argument("--json", type=Path, default=RESULTS / "activations.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="models, targets and optimized graphs")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (16 if args.quick else 56)
    args.width = args.width or (8 if args.quick else 16)
    args.calib_count, args.eval_count = (16, 16) if args.quick else (128, 256)
    args.cycles, args.block = (2, 3) if args.quick else (30, 20)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    if bad := [n for n in nets if n not in NETS]:
        parser.error(f"unknown network '{bad[0]}' (known: {', '.join(NETS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    m = machine()
    rows = [row for net in nets for row in measure_net(net, args, args.out)]
    print_table(rows, m, argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": m, "argv": argv, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
