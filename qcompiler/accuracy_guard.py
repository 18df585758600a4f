"""The accuracy guard: after compiling, measure the model as onnxruntime runs it on held-out data,
and put the most damaging layers back in float until a goal (output SQNR, labelled accuracy drop)
is met, or nothing is left to try.

NNCF's accuracy-control loop does this on its own graphs; here it works on the compiled ONNX model
itself. Each quantized layer's *contribution* is measured, not guessed: the output SQNR with that
layer alone in float (its float weight and bias back, its input read unrounded). Layers are
then tried most damaging first, and a fallback is kept only when it measurably helps, so the
model written is the best one found whether or not the goal is met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompiler.data import DataSource
from qcompiler.ir import NameAuthority, add_initializer, copy_model, to_proto
from qcompiler.pass_manager import ProgressFactory, null_progress
from qcompiler.runtime import make_session, run_checked

#: A fallback is kept only when it gains at least this much SQNR (smaller changes are noise on
#: a few hundred samples, and each fallback costs speed).
MIN_GAIN_DB = 0.1
#: Samples the guard measures each candidate on (the final verification uses all of them).
GUARD_SAMPLES = 256
#: Why the guard only measured, when the user chose the loss (see `guard`'s ``measured_only_because``).
WIDTHS_CHOSEN = "the weight widths are your choice (assign-precision under a budget, or a pass's bits= option)"
WEIGHTS_SET_BY_PIPELINE = "pruning, clustering or retraining set the weights as the pipeline asked"


@dataclass
class Goal:
    """What the compiled model must reach on held-out data, as onnxruntime runs it."""

    #: Lowest acceptable SQNR (dB) of every graph output against the float model; None: no bound.
    min_sqnr_db: float | None = 20.0
    #: Largest acceptable top-1 accuracy drop in points (needs labels); None: no bound.
    max_drop_points: float | None = None

    def describe(self) -> str:
        parts = []
        if self.min_sqnr_db is not None:
            parts.append(f"output SQNR >= {self.min_sqnr_db:g} dB")
        if self.max_drop_points is not None:
            parts.append(f"top-1 drop <= {self.max_drop_points:g} points")
        return " and ".join(parts) or "none"


@dataclass
class Quality:
    """A model's agreement with the float model on the guard's samples."""

    sqnr_db: float
    drop_points: float | None

    def meets(self, goal: Goal) -> bool:
        sqnr_ok = goal.min_sqnr_db is None or self.sqnr_db >= goal.min_sqnr_db
        drop_ok = goal.max_drop_points is None or (self.drop_points is not None and self.drop_points <= goal.max_drop_points)
        return sqnr_ok and drop_ok

    def better_than(self, other: Quality, goal: Goal) -> bool:
        """Closer to the goal: a smaller accuracy drop where that is the goal, else a higher SQNR."""
        if goal.max_drop_points is not None and self.drop_points is not None and other.drop_points is not None and self.drop_points != other.drop_points:
            return self.drop_points < other.drop_points
        return self.sqnr_db > other.sqnr_db + MIN_GAIN_DB


@dataclass
class Fallback:
    node: str
    op_type: str
    #: What was done: "float" (weight, bias and output back in float).
    action: str
    sqnr_before_db: float
    sqnr_after_db: float
    drop_before_points: float | None = None
    drop_after_points: float | None = None


@dataclass
class GuardReport:
    """What the guard measured and did; ``report.json``'s ``guard``."""

    goal: str
    samples: int
    data: str
    met: bool
    sqnr_db: float
    drop_points: float | None
    #: The quality as compiled, before any fallback.
    initial_sqnr_db: float
    initial_drop_points: float | None
    fallbacks: list[Fallback] = field(default_factory=list)
    #: False where the guard only measured (widths chosen under a budget, no explicit goal).
    fell_back: bool = True
    #: Each quantized layer's output SQNR with it alone in float (measured when the goal was
    #: missed), most damaging first.
    contributions: list[dict[str, object]] = field(default_factory=list)
    note: str = ""


class _Judge:
    """Runs candidate models on the guard's samples against the float outputs (computed once)."""

    def __init__(self, float_proto: onnx.ModelProto, data: DataSource, optimize: bool) -> None:
        self.data = data
        self.optimize = optimize
        self.output_names = [o.name for o in float_proto.graph.output]
        session = make_session(float_proto, optimize=optimize, what="float model", prepack=False)
        self.reference = self._run(session)
        del session  # closed before any candidate opens (a model over 2 GB: its weights mapped)
        self.labels = data.labels if data.labels is not None and self._classifier(self.reference[0]) else None
        self.float_correct = None if self.labels is None else float(np.mean(self.reference[0].argmax(-1) == self.labels[: len(self.reference[0])]))

    @staticmethod
    def _classifier(output: np.ndarray) -> bool:
        return output.ndim == 2 and output.shape[1] > 1

    def _run(self, session) -> list[np.ndarray]:
        chunks = [run_checked(session, self.output_names, batch, what="model", data=self.data.origin) for batch in self.data.batches(64)]
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.output_names))]

    def quality(self, model: ir.Model | onnx.ModelProto) -> Quality:
        proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
        got = self._run(make_session(proto, optimize=self.optimize, what="quantized model"))
        sqnr = min(_sqnr(r, g) for r, g in zip(self.reference, got))
        drop = None
        if self.labels is not None:
            correct = float(np.mean(got[0].argmax(-1) == self.labels[: len(got[0])]))
            drop = 100.0 * (self.float_correct - correct)
        return Quality(sqnr, drop)


def _sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    diff = ref - np.nan_to_num(got.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    noise, signal = float(np.sum(diff**2)), float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class FloatLookup:
    """A quantized embedding lookup (quantize-embeddings) as the guard puts it back in float: the
    float ``table`` gathered again by the index tensor named ``ids``, in place of the output of the
    node that dequantized the integer rows."""

    table: np.ndarray
    ids: str

    def restore(self, model: ir.Model, node: ir.Node) -> bool:
        graph = model.graph
        ids = next((v for n in graph for v in n.inputs if v is not None and v.name == self.ids), None)
        if ids is None:
            return False
        names = NameAuthority(graph)
        table = add_initializer(graph, names, f"{node.name}_float_table", self.table)
        gather = ir.Node("", "Gather", [table, ids], attributes=[ir.AttrInt64("axis", 0)], name=names.fresh(f"{node.name}_float"))
        out = node.outputs[0]
        gather.outputs[0].dtype, gather.outputs[0].shape = out.dtype, out.shape
        graph.insert_before(node, gather)
        name = out.name
        out.replace_all_uses_with(gather.outputs[0], replace_graph_outputs=True)
        out.name, gather.outputs[0].name = names.fresh(f"{name}_quantized_lookup"), name
        RemoveUnusedNodesPass()(model)
        return True


#: What the guard needs to put one layer back in float: its float inputs by index, or a lookup.
FloatLayer = dict[int, ir.TensorProtocol | np.ndarray | None] | FloatLookup


def layer_in_float(model: ir.Model, node_name: str, float_inputs: FloatLayer) -> bool:
    """Put one quantized layer of ``model`` back in float, in place: its float weight and bias as
    initializers, and its activation inputs read unrounded where a QuantizeLinear ->
    DequantizeLinear pair stood (other readers keep the quantizer). Its output quantizer stays:
    the next quantized ops read integers from it, and it does the work of any activation it
    absorbed. A `FloatLookup` gathers its float table again instead. False if the node is not there."""
    graph = model.graph
    node = next((n for n in graph if n.name == node_name), None)
    if node is None:
        return False
    if isinstance(float_inputs, FloatLookup):
        return float_inputs.restore(model, node)
    names = NameAuthority(graph)
    for index, array in sorted(float_inputs.items(), reverse=True):
        if index >= len(node.inputs):
            continue
        if array is None:  # an input the float layer did not have (a bias added by bias correction)
            if index == len(node.inputs) - 1:
                node.resize_inputs(index)
            continue
        node.replace_input_with(index, add_initializer(graph, names, f"{node_name}_float_input{index}", array if isinstance(array, ir.TensorProtocol) else np.asarray(array)))
    for index, value in enumerate(node.inputs):
        dq = value.producer() if value is not None else None
        q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and (unrounded := _unrounded(graph, names, q)) is not None:
            node.replace_input_with(index, unrounded)
    RemoveUnusedNodesPass()(model)
    return True


def _unrounded(graph: ir.Graph, names: NameAuthority, q: ir.Node) -> ir.Value | None:
    """What QuantizeLinear ``q`` -> DequantizeLinear computes, without the rounding: its input
    clipped to the quantizer's saturation range. The quantizer may have absorbed an activation
    (Relu, Clip), whose work the clip keeps."""
    bounds = _saturation_bounds(q)
    x = q.inputs[0]
    if bounds is None or x is None:
        return None
    base = q.name or x.name
    lo = add_initializer(graph, names, f"{base}_float_min", np.asarray(bounds[0], np.float32))
    hi = add_initializer(graph, names, f"{base}_float_max", np.asarray(bounds[1], np.float32))
    clip = ir.Node("", "Clip", [x, lo, hi], name=names.fresh(f"{base}_unrounded"))
    clip.outputs[0].name = names.fresh(f"{x.name}_unrounded")
    clip.outputs[0].dtype, clip.outputs[0].shape = x.dtype, x.shape
    graph.insert_before(q, clip)
    return clip.outputs[0]


def _saturation_bounds(q: ir.Node) -> tuple[float, float] | None:
    """The float range a per-tensor QuantizeLinear saturates at: (qmin - zp) x s, (qmax - zp) x s."""
    scale = q.inputs[1].const_value if len(q.inputs) > 1 and q.inputs[1] is not None else None
    zp = q.inputs[2].const_value if len(q.inputs) > 2 and q.inputs[2] is not None else None
    if scale is None or zp is None or scale.size != 1:
        return None
    info = np.iinfo(zp.numpy().dtype) if zp.numpy().dtype.kind in "iu" else None
    if info is None:
        return None
    s, z = float(scale.numpy().reshape(())), int(zp.numpy().reshape(()))
    return (info.min - z) * s, (info.max - z) * s


def guard(
    float_proto: onnx.ModelProto,
    model: ir.Model,
    float_layers: dict[str, FloatLayer],
    data: DataSource,
    goal: Goal,
    *,
    optimize: bool = True,
    progress: ProgressFactory = null_progress,
    fall_back: bool = True,
    measured_only_because: str = WIDTHS_CHOSEN,
) -> tuple[ir.Model, GuardReport]:
    """Measure ``model`` against ``goal`` on ``data`` (held out from calibration) and, where it
    misses, fall back layer by layer; return the best model found and what was done. Without
    ``fall_back`` it only measures and says so, ``measured_only_because`` (the user chose the loss)."""
    data = data.head(GUARD_SAMPLES)
    judge = _Judge(float_proto, data, optimize)
    if goal.max_drop_points is not None and judge.labels is None:
        from qcompiler.errors import QCError

        raise QCError("--max-drop needs integer 'labels' in the verification data and a classifier output [N, C]", option="--max-drop")
    initial = judge.quality(model)
    report = GuardReport(goal=goal.describe(), samples=data.usable_samples, data=data.origin, met=initial.meets(goal), sqnr_db=initial.sqnr_db, drop_points=initial.drop_points,
                         initial_sqnr_db=initial.sqnr_db, initial_drop_points=initial.drop_points)
    if report.met:
        return model, report
    if not fall_back:
        report.fell_back = False
        report.note = f"measured only: {measured_only_because}; pass --min-sqnr or --max-drop to let the guard put layers back in float"
        return model, report
    ops = {n.name: n.op_type for n in model.graph}
    candidates = [name for name in float_layers if name in ops]
    if not candidates:
        report.note = "no quantized layer with float weights to fall back on (the goal was missed as compiled)"
        return model, report
    contributions: dict[str, Quality] = {}
    with progress("accuracy guard", 2 * len(candidates)) as bar:
        for name in candidates:
            trial = copy_model(model)
            layer_in_float(trial, name, float_layers[name])
            contributions[name] = judge.quality(trial)
            bar.advance()
        order = sorted(candidates, key=lambda n: (-(contributions[n].sqnr_db if math.isfinite(contributions[n].sqnr_db) else 1e9), n))
        if goal.max_drop_points is not None:
            order = sorted(order, key=lambda n: contributions[n].drop_points)
        report.contributions = [{"node": n, "op_type": ops[n], "sqnr_db_alone_float": contributions[n].sqnr_db, "drop_points_alone_float": contributions[n].drop_points} for n in order]
        best, current = model, initial
        for name in order:
            trial = copy_model(best)
            layer_in_float(trial, name, float_layers[name])
            quality = judge.quality(trial)
            bar.advance()
            if quality.better_than(current, goal):
                report.fallbacks.append(Fallback(name, ops[name], "float", current.sqnr_db, quality.sqnr_db, current.drop_points, quality.drop_points))
                best, current = trial, quality
                if current.meets(goal):
                    break
    report.met, report.sqnr_db, report.drop_points = current.meets(goal), current.sqnr_db, current.drop_points
    if not report.met:
        report.note = f"goal missed: the best model found reaches SQNR {current.sqnr_db:.2f} dB" + (f", top-1 drop {current.drop_points:.2f} points" if current.drop_points is not None else "") + f" with {len(report.fallbacks)} layer(s) in float"
    return best, report
