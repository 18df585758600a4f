"""insert-qdq: quantize the graph as the target describes, as QuantizeLinear/DequantizeLinear pairs.

Plan first, rewrite second:

1. Walk the graph in order and decide which nodes run quantized: ops the target lists as
   ``quantized`` (with constant weights), ``passthrough`` ops whose input is already quantized, and
   activations (``fused_activations``) that the following quantizer makes redundant. Every other node
   touching float data stays float and is reported with the reason.
2. Group tensors that must share one scale (a passthrough op's input and output, a Concat's inputs
   and output) and derive each group's scale and zero point from the calibrated ranges.
3. Rewrite: each quantized activation gets Q -> DQ after its producer; weights are stored as
   integers behind a DequantizeLinear (per channel when the target says so); biases become int32 with
   scale = input scale x weight scale, as the integer kernels require.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx

from qcompiler.calibration import CALIBRATION_FACT, CalibrationRanges
from qcompiler.quant.adaround import pair_sum_violations
from qcompiler.precision import ACTIVATION_BITS_FACT, FLOAT_LAYER_INPUTS_FACT, ROUNDED_WEIGHTS_FACT, WEIGHT_BITS_FACT
from qcompiler.errors import QCError
from qcompiler.format_metadata import annotate_formats
from qcompiler.ir import SOURCE_KEY, NameAuthority, upgraded_to, annotate_types, add_initializer, constant_array, is_float_tensor, opset_version, to_proto
from qcompiler.op_roles import decomposed_activations, input_roles
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.quant.bias_correction import InputMeans, LayerInputMeans, corrected_bias, correctable_inputs
from qcompiler.quant.observers import Observer
from qcompiler.quant.uniform import affine_params, dequantize, int32_bias_scale_floor, quantize, raise_scales
from qcompiler.registry import register_pass
from qcompiler.cost_model import storage_dtype, storage_width
from qcompiler.quant.weights import RoundedWeight, WeightRange, dequantize_weight, quantize_float8, quantize_weight, stored_tensor, weight_layout, weight_qrange
from qcompiler.targets.spec import FLOAT8_DTYPES, FLOAT_WIDTH, INTEGER_DTYPES, IR_TYPES, TargetSpec, TensorRule



class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass
class QuantPlan:
    """What insert-qdq will do, decided before anything is rewritten."""

    quantized_nodes: list[ir.Node] = field(default_factory=list)
    #: Activation values (by name) that get a Q/DQ pair, in graph order.
    values: dict[str, ir.Value] = field(default_factory=dict)
    #: Activation node -> the node whose output it follows; removed, its range used for that output.
    fused: dict[int, tuple[ir.Node, ir.Node]] = field(default_factory=dict)
    #: Activations the backend fuses into the op before them (``activation_fusion = "keep"``): they
    #: stay in the graph and the quantizer goes after them, none between op and activation.
    kept_activations: set[int] = field(default_factory=set)
    groups: _UnionFind = field(default_factory=_UnionFind)
    #: (node, reason) for every node that touches float data and stays float.
    kept_float: list[tuple[ir.Node, str]] = field(default_factory=list)


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """Constant (min, max) of a Relu or Clip; None when they are computed at run time."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo, hi = -float("inf"), float("inf")
    if "min" in node.attributes:  # opset < 11
        lo = node.attributes["min"].as_float()
    if "max" in node.attributes:
        hi = node.attributes["max"].as_float()
    for index, default in ((1, None), (2, None)):
        if len(node.inputs) > index and node.inputs[index] is not None:
            array = constant_array(node.inputs[index])
            if array is None:
                return None
            if index == 1:
                lo = float(array)
            else:
                hi = float(array)
    return lo, hi


def plan_quantization(model: ir.Model, target: TargetSpec, observers: dict[str, Observer], weight_bits: dict[str, int] | None = None) -> QuantPlan:
    """Decide which nodes run quantized and which tensors share scales (no rewriting).

    A weight assign-precision gave 32 bits (``FLOAT_WIDTH``) keeps its layer float. Where the
    target has a float fallback, a weightless op (Add, Mul, pooling, data movement) is quantized
    only inside a quantized region: it does not start one (no quantized input) and does not end
    one (no quantized reader of its output), since there it would add roundings that no integer
    kernel reads: an attention mask Add before a float Softmax, a positional Add after a float
    embedding. Dropping one op can strand its neighbours, so the plan is redrawn until stable.
    """
    weight_bits = weight_bits or {}
    if not target.activations.quantize:
        return _plan_weight_only(model, target, weight_bits)
    forced: dict[int, str] = {}
    for _ in range(8):
        plan = _plan(model, target, observers, weight_bits, forced)
        stranded = _ends_nothing(model, plan, target.ops) if target.ops.float_fallback else {}
        if not stranded:
            break
        forced.update(stranded)
    return plan


def _ends_nothing(model: ir.Model, plan: QuantPlan, ops) -> dict[int, str]:
    """Weightless quantized nodes whose outputs only float ops read (walked from the outputs back,
    so a chain of them goes at once), with the reason they stay float. A graph output is a
    region's natural end, not a float reader."""
    quantized = {id(n) for n in plan.quantized_nodes}
    transparent = set(plan.fused) | set(plan.kept_activations)

    def read_quantized(value: ir.Value, depth: int = 0) -> bool:
        if value.is_graph_output():
            return True  # the region ends at the model's output (one dequantization), as designed
        for consumer in value.consumers():
            if id(consumer) in quantized:
                return True
            # A fused activation's output is where the layer's quantizer sits: look past it.
            if id(consumer) in transparent and depth < 4 and any(read_quantized(o, depth + 1) for o in consumer.outputs):
                return True
        return False

    stranded = {}
    for node in reversed(list(model.graph)):
        if id(node) not in quantized or input_roles(node).weight is not None:
            continue
        if not any(read_quantized(out) for out in node.outputs):
            quantized.discard(id(node))
            stranded[id(node)] = "its output feeds only float ops (a weightless op does not end a quantized region: the roundings would reach no integer kernel)"
    return stranded


def _plan(model: ir.Model, target: TargetSpec, observers: dict[str, Observer], weight_bits: dict[str, int], forced: dict[int, str]) -> QuantPlan:
    plan = QuantPlan()
    ops = target.ops
    graph_outputs = {v.name for v in model.graph.outputs}

    def is_activation(value: ir.Value | None) -> bool:
        return is_float_tensor(value) and value.const_value is None

    def unsupported_float(node: ir.Node) -> ir.DataType | None:
        # Scales are float32, and before opset 19 QuantizeLinear takes float32 only.
        for v in [*node.inputs, *node.outputs]:
            if is_float_tensor(v) and v.dtype != ir.DataType.FLOAT:
                return v.dtype
        return None

    def add_output(node: ir.Node) -> None:
        out = node.outputs[0]
        consumers = out.consumers()
        if len(consumers) == 1 and not out.is_graph_output():
            act = consumers[0]
            act_out = act.outputs[0]
            # Fusing only pays when the activation's output gets the quantizer that replaces it.
            quantized_after = act_out.name not in graph_outputs or ops.quantize_graph_outputs
            if act.op_type in ops.fused_activations and act.inputs[0] is out and act_out.name in observers and quantized_after:
                if ops.activation_fusion == "keep":
                    plan.kept_activations.add(id(act))
                    out = act_out
                elif _clip_bounds(act) is not None:
                    plan.fused[id(act)] = (act, node)
                    out = act_out
        if out.name in graph_outputs and not ops.quantize_graph_outputs:
            return
        plan.values[out.name] = out

    # An activation written as several ops (Gelu's Erf form) is one activation to the target: the
    # Mul/Add inside it stay float with it when the target keeps that activation float.
    decomposed = decomposed_activations(model.graph)
    for node in model.graph:
        op = node.op_type
        float_inputs = [v for v in node.inputs if is_activation(v)]
        float_outputs = [v for v in node.outputs if is_float_tensor(v)]
        if id(node) in plan.fused or id(node) in plan.kept_activations:
            continue
        if id(node) in forced:
            plan.kept_float.append((node, forced[id(node)]))
            continue
        if id(node) in decomposed and (act := decomposed[id(node)][0]) not in ops.quantized and (why := ops.float_reason(act)):
            plan.kept_float.append((node, f"{act} ({op} of its decomposed form) kept float by target '{target.name}': {why}"))
            continue
        if not any(is_activation(v) for v in float_outputs):
            continue  # shape arithmetic and other integer computations: nothing to quantize
        if node.domain not in ("", "ai.onnx"):
            if float_inputs or float_outputs:
                plan.kept_float.append((node, f"custom-domain op '{node.domain}.{op}' is not quantized by target '{target.name}'"))
            continue
        if (other := unsupported_float(node)) is not None and (op in ops.quantized or op in ops.passthrough):
            plan.kept_float.append((node, f"{other.name.lower()} data: insert-qdq quantizes float32 tensors only"))
            continue
        if op in ops.quantized:
            roles = input_roles(node)
            reason = None
            if ops.float_fallback and roles.weight is None and not any(v.name in plan.values for v in float_inputs):
                # A weightless op (Add, Mul, pooling) continues a quantized region; it does not start
                # one: quantizing float inputs only to run, say, a mask Add in integers adds two
                # roundings for no saving (the layer after quantizes its own input).
                plan.kept_float.append((node, "none of its inputs is quantized (a weightless op does not start a quantized region)"))
                continue
            if roles.weight is not None:
                w = node.inputs[roles.weight] if len(node.inputs) > roles.weight else None
                if w is None or constant_array(w) is None or not is_float_tensor(w):
                    reason = "weight is not a float constant"
            acts = [node.inputs[i] for i in roles.activations if i < len(node.inputs) and is_activation(node.inputs[i])]
            if reason is None and roles.weight is not None and weight_bits.get(w.name) == FLOAT_WIDTH:
                reason = "left float by assign-precision"
            if reason is None and not acts:
                reason = "no float activation input"
            missing = [v.name for v in acts if v.name not in observers]
            if reason is None and missing:
                reason = f"no calibration range for '{missing[0]}'"
            if reason is None and len(float_outputs) != 1:
                reason = "has more than one float output"
            if reason is None and node.outputs[0].name not in observers and node.outputs[0].name not in graph_outputs:
                reason = f"no calibration range for '{node.outputs[0].name}'"
            if reason is not None:
                plan.kept_float.append((node, reason))
                continue
            plan.quantized_nodes.append(node)
            for value in acts:
                plan.values.setdefault(value.name, value)
            add_output(node)
            if op in ops.shared_scale:
                for value in acts:
                    plan.groups.union(value.name, plan.values.get(node.outputs[0].name, node.outputs[0]).name)
        elif op in ops.passthrough:
            data, out = node.inputs[0] if node.inputs else None, node.outputs[0]
            if data is not None and data.name in plan.values and is_float_tensor(out) and out.name in observers:
                plan.quantized_nodes.append(node)
                if not (out.name in graph_outputs and not ops.quantize_graph_outputs):
                    plan.values[out.name] = out
                    plan.groups.union(out.name, data.name)
            elif float_inputs:
                plan.kept_float.append((node, "its input is not quantized"))
        elif float_inputs or (float_outputs and any(is_activation(v) for v in float_outputs)):
            # A target that measured an op and keeps it float on purpose says why ([ops.kept_float]).
            why = ops.float_reason(op)
            if inner := _inner_layers(node):
                # Control flow: its subgraphs run as the float model wrote them.
                why = f"its subgraphs stay float (insert-qdq does not quantize inside control flow; {len(inner)} layer(s) there, e.g. {inner[0].op_type} '{inner[0].name}')"
            plan.kept_float.append((node, f"{op} kept float by target '{target.name}': {why}" if why else f"op type {op} is not quantized by target '{target.name}'"))
    if ops.placement == "inputs":
        _keep_input_quantizers(plan, ops.quantized)
    return plan


def _inner_layers(node: ir.Node) -> list[ir.Node]:
    """The Conv/ConvTranspose/Gemm/MatMul nodes inside ``node``'s subgraphs (If, Loop, Scan)."""
    graphs = [g for attr in node.attributes.values() if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
              for g in (attr.as_graphs() if attr.type == ir.AttributeType.GRAPHS else [attr.as_graph()])]
    return [n for g in graphs for n in ir.traversal.RecursiveGraphIterator(g) if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]


def _plan_weight_only(model: ir.Model, target: TargetSpec, weight_bits: dict[str, int]) -> QuantPlan:
    """Weight-only targets: every listed op with a float constant weight gets integer weights;
    activations stay float, so nothing else is planned or reported."""
    plan = QuantPlan()
    for node in model.graph:
        if node.op_type not in target.ops.quantized or node.domain not in ("", "ai.onnx"):
            continue
        roles = input_roles(node)
        w = node.inputs[roles.weight] if roles.weight is not None and roles.weight < len(node.inputs) else None
        if w is None or constant_array(w) is None or not is_float_tensor(w) or w.dtype != ir.DataType.FLOAT:
            if roles.weight is not None:
                plan.kept_float.append((node, "weight is not a float32 constant"))
            continue
        if weight_bits.get(w.name) == FLOAT_WIDTH:
            plan.kept_float.append((node, "left float by assign-precision"))
            continue
        plan.quantized_nodes.append(node)
    return plan


def _keep_input_quantizers(plan: QuantPlan, compute_ops: tuple[str, ...]) -> None:
    """Keep only the quantizers a quantized op reads (through passthrough ops): backends such as
    TensorRT place Q/DQ on the inputs of the layers they run in integer, and a quantizer on an
    output nothing quantized reads only costs a requantization."""
    needed: set[str] = set()
    kept: list[ir.Node] = []
    for node in reversed(plan.quantized_nodes):
        if node.op_type in compute_ops:
            needed.update(v.name for v in node.inputs if v is not None and v.name in plan.values)
            kept.append(node)
        elif node.outputs[0].name in needed and node.inputs[0] is not None:
            needed.add(node.inputs[0].name)
            kept.append(node)
    plan.quantized_nodes = kept[::-1]
    plan.values = {name: value for name, value in plan.values.items() if name in needed}


@dataclass
class _Params:
    scale: np.ndarray
    zero_point: np.ndarray
    scale_value: ir.Value | None = None
    zp_value: ir.Value | None = None


@register_pass
class InsertQDQ(Pass):
    """Quantize per the target: QuantizeLinear/DequantizeLinear on activations, integer weights and int32 biases."""

    name = "insert-qdq"
    requires = (CalibrationRanges,)

    @dataclass(frozen=True)
    class Options:
        #: How each weight channel's range is chosen: its min/max, the range minimising the
        #: squared quantization error (clips rare outlier weights), or auto: min/max at 4 bits and
        #: more, MSE below (the same rule assign-precision scores widths with).
        weight_range: WeightRange = "auto"
        #: Fold the mean output shift that weight quantization causes (measured on the calibration
        #: data) into each Conv/ConvTranspose/Gemm bias. Worth +1.3 points at 4 bits and +11 at
        #: 3 bits on ResNet-20; at 8 bits the shift is below the int32 bias step.
        bias_correction: bool = True
        #: Where the target turns on ``[speed] keep_slower_float``: time each weight layer on this
        #: CPU, quantized and in float with its DequantizeLinear/QuantizeLinear boundary, and leave
        #: float those measurably slower quantized (`qcompiler.layer_speed`). False: measure nothing.
        speed_check: bool = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        target = ctx.target
        # Per-channel DequantizeLinear needs the target's opset: upgrade with the ONNX converter.
        model, old = upgraded_to(model, target.min_opset, self.name, "the target's minimum")
        if old is not None:
            ctx.note(self.name, f"model upgraded from opset {old} to {target.min_opset}")
        # A pass before this one may have created untyped values; float data is found by type.
        annotate_types(model)
        weight_only = not target.activations.quantize
        observers = {}
        if not weight_only:
            analysis = ctx.facts.get(CALIBRATION_FACT, CalibrationRanges())
            observers = ctx.analyses.get(analysis, model, ctx)
            # A tensor the calibration data never gave a value (empty for every sample, or in a
            # branch no sample took) has no range: it stays float rather than get an invented one.
            unseen = sorted(n for n, o in observers.items() if o.count == 0)
            if unseen:
                observers = {n: o for n, o in observers.items() if o.count > 0}
                ctx.note(self.name, f"{len(unseen)} tensor(s) had no values on the calibration data and stay float: {', '.join(unseen[:5])}{' ...' if len(unseen) > 5 else ''}", level="warning")
        input_means = {}
        # Bias correction measures layer inputs on the calibration data; weight-only targets
        # compile without data, and correct only when some is given.
        if self.options.bias_correction and (ctx.data is not None or not weight_only):
            # Means of the float model's layer inputs, keyed by node before the rewrite renames them.
            means = ctx.analyses.get(LayerInputMeans(), model, ctx)
            input_means = {node: means[x.name] for node, x in correctable_inputs(model).items() if x.name in means}
        plan = plan_quantization(model, target, observers, ctx.facts.get(WEIGHT_BITS_FACT))
        plan, speed = self._check_speed(model, ctx, plan, observers)
        rewriter = _Rewriter(model, target, observers, plan, weight_range=self.options.weight_range, weight_bits=ctx.facts.get(WEIGHT_BITS_FACT), input_means=input_means, activation_bits=ctx.facts.get(ACTIVATION_BITS_FACT), rounded_weights=ctx.facts.get(ROUNDED_WEIGHTS_FACT))
        unfused = rewriter.compute_group_params()
        for act in unfused:
            ctx.note(self.name, "activation kept between quantizers of its range (its bounds are not exactly the quantizer's ends)", node=act.name)
        rewriter.apply()
        ctx.facts[FLOAT_LAYER_INPUTS_FACT] = {name: inputs for name, inputs in rewriter.float_inputs.items() if inputs}
        for note in sorted(rewriter.notes):
            ctx.note(self.name, note, level="warning")
        for node, reason in plan.kept_float:
            ctx.note(self.name, reason, node=node.name, level="float", op_type=node.op_type)
        annotate_formats(model, ctx.facts.get(WEIGHT_BITS_FACT))
        model.graph.sort()
        return PassResult(
            model,
            bool(plan.quantized_nodes),
            {"quantized_nodes": len(plan.quantized_nodes), "float_nodes": len(plan.kept_float), "fused_activations": len(plan.fused), "qdq_pairs": len(plan.values), "bias_corrected": rewriter.bias_corrected, **({"speed_check": speed} if speed is not None else {})},
        )

    def _check_speed(self, model: ir.Model, ctx: PassContext, plan: QuantPlan, observers: dict[str, Observer]) -> tuple[QuantPlan, dict | None]:
        """The plan with the weight layers that run slower quantized on this CPU left float, and the
        per-layer evidence for the report (None where the target has no speed check)."""
        from qcompiler.layer_speed import check_layers, skip_reason
        from qcompiler.latency_table import WEIGHT_OPS

        target = ctx.target
        if not target.speed.keep_slower_float:
            return plan, None
        weight_bits = ctx.facts.get(WEIGHT_BITS_FACT)
        reason = skip_reason(target)
        if not self.options.speed_check:
            reason = "turned off (insert-qdq{speed-check=false})"
        elif reason is None and weight_bits is not None:
            # A layer left float would break the size or latency budget assign-precision met.
            reason = "weight widths chosen by assign-precision under a budget"
        if reason is not None:
            ctx.note(self.name, f"per-layer speed check skipped: {reason}")
            return plan, {"skipped": reason}
        default = target.bits.default or target.weights.bits
        layers = []
        for node in plan.quantized_nodes:
            roles = input_roles(node)
            if node.op_type in WEIGHT_OPS and roles.weight is not None:
                layers.append((node, storage_width(default, target.bits.native), storage_dtype(target, default)))
        decisions, summary = check_layers(layers, target, progress=ctx.progress)
        slow = {d.node: d.note for d in decisions if d.keep_float}
        ctx.note(self.name, f"per-layer speed check on {summary['cpu']}: {len(decisions)} weight layers, {summary['layers_timed']} timed ({summary['cache_hits']} from the cache, {summary['seconds']:.1f} s), {len(slow)} left float")
        if slow:
            bits = dict(weight_bits or {})
            for node, _, _ in layers:
                if node.name in slow:
                    bits[node.inputs[input_roles(node).weight].name] = FLOAT_WIDTH
            plan = plan_quantization(model, target, observers, bits)
            plan.kept_float = [(node, slow.get(node.name, why)) for node, why in plan.kept_float]
        return plan, {**summary, "left_float": len(slow), "layers": [d.to_dict() for d in decisions]}


@dataclass
class _StoredWeight:
    """A weight as insert-qdq stored it. The float and dequantized arrays are made again when bias
    correction asks, not kept: a model's weights would otherwise be held twice over (a model over
    2 GB reads its float weights from their file)."""

    dq_out: ir.Value
    source: ir.TensorProtocol | np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    rule: TensorRule
    axis: int | None
    block: int

    @property
    def channel_scale(self) -> np.ndarray | None:
        """The per-channel (or tensor) scale; None for a per-block one, from which no int32 bias
        can be derived."""
        return None if self.block else self.scale

    def float_weight(self) -> np.ndarray:
        return np.asarray(self.source, np.float32)

    def dequantized(self) -> np.ndarray:
        stored = self.dq_out.producer().inputs[0].const_value
        codes = stored.numpy()
        if stored.dtype.is_integer():
            codes = codes.astype(np.int32)  # int4/uint4 arrays (ml_dtypes) do arithmetic as int32
        if self.block:
            return dequantize_weight(codes, self.scale, self.zero_point, self.rule, self.axis)
        return dequantize(codes, self.scale, self.zero_point, axis=self.axis)


class _Rewriter:
    def __init__(self, model: ir.Model, target: TargetSpec, observers: dict[str, Observer], plan: QuantPlan, *, weight_range: str = "auto", weight_bits: dict[str, int] | None = None, input_means: dict[str, InputMeans] | None = None, activation_bits: int | None = None, rounded_weights: dict[str, RoundedWeight] | None = None) -> None:
        self.model = model
        rule = target.activations
        # A width below the dtype's: the b-bit integer range inside the dtype, enforced by a Clip
        # after each QuantizeLinear (QuantizeLinear itself saturates only at the dtype's range).
        self.act_bits = activation_bits or rule.bits
        self.act_qrange = weight_qrange(rule, self.act_bits) if self.act_bits < rule.bits else rule.qrange
        self.act_levels = self.act_qrange[1] - self.act_qrange[0] + 1
        self.input_means = input_means or {}
        self.bias_corrected = 0
        self.notes: set[str] = set()
        self.weight_bits = weight_bits or {}
        self.weight_range = weight_range
        self.rounded_weights: dict[str, RoundedWeight] = rounded_weights or {}
        self.graph = model.graph
        self.target = target
        self.observers = observers
        self.plan = plan
        self.names = NameAuthority(model.graph)
        self.params: dict[str, _Params] = {}  # group root -> params
        self.dq_of: dict[str, ir.Value] = {}  # activation name -> its DequantizeLinear output
        # id(weight value) and id(its DQ output) -> what was stored for it (shared weights: once)
        self.weight_cache: dict[int, _StoredWeight] = {}
        #: quantized node -> {input index: its float weight or bias before quantization}
        self.float_inputs: dict[str, dict[int, ir.TensorProtocol | None]] = {}

    # -- planning the numbers -------------------------------------------------------------------
    def compute_group_params(self) -> list[ir.Node]:
        """Scales per shared-scale group; un-fuse activations the quantizer would not make redundant."""
        rule = self.target.activations
        qmin, qmax = self.act_qrange
        members: dict[str, list[str]] = {}
        for name in self.plan.values:
            members.setdefault(self.plan.groups.find(name), []).append(name)
        # A fused activation's output never leaves its bounds: calibration noise (a histogram bin,
        # an MSE search) must not widen the quantizer past them and waste levels.
        bounds = {act.outputs[0].name: _clip_bounds(act) for act, _ in self.plan.fused.values()}
        for root, names in members.items():
            ranges = [self._bounded(self.observers[n].range(levels=self.act_levels, symmetric=rule.symmetric), bounds.get(n)) for n in names]
            lo = min(r[0] for r in ranges)
            hi = max(r[1] for r in ranges)
            scale, zp = affine_params(lo, hi, qmin, qmax, rule.symmetric)
            self.params[root] = _Params(scale, zp)
        unfused = []
        for key, (act, producer) in list(self.plan.fused.items()):
            p = self.params[self.plan.groups.find(act.outputs[0].name)]
            clip_lo, clip_hi = _clip_bounds(act)
            # QuantizeLinear is monotone and saturates, so Q(clip(x)) == Q(x) for every x exactly
            # when the bounds themselves quantize to the ends of the integer range.
            # An infinite bound (Relu's top) clips nothing on its side.
            lo_exact = clip_lo == -np.inf or quantize(np.float32(clip_lo), p.scale, p.zero_point, qmin, qmax) == qmin
            hi_exact = clip_hi == np.inf or quantize(np.float32(clip_hi), p.scale, p.zero_point, qmin, qmax) == qmax
            if not (lo_exact and hi_exact):
                # The activation stays, between quantizers of its own output's scale: the
                # producer's output is quantized over the activation's range, not its own wider
                # one (quantizing it twice over different ranges wastes most of the levels).
                del self.plan.fused[key]
                unfused.append(act)
                out = producer.outputs[0]
                self.plan.values[out.name] = out
                self.params[self.plan.groups.find(out.name)] = p
        return unfused

    @staticmethod
    def _bounded(r: tuple[float, float], bounds: tuple[float, float] | None) -> tuple[float, float]:
        if bounds is None:
            return r
        lo, hi = max(float(r[0]), bounds[0]), min(float(r[1]), bounds[1])
        return (lo, hi) if lo <= hi else (bounds[0], max(bounds[0], min(float(r[1]), bounds[1])))

    def _activation_params(self, name: str) -> _Params:
        p = self.params[self.plan.groups.find(name)]
        if p.scale_value is None:
            dtype = self.target.activations.dtype
            p.scale_value = self._initializer(f"{name}_scale", p.scale.astype(np.float32).reshape(()))
            p.zp_value = self._initializer(f"{name}_zero_point", self._as_qtype(p.zero_point.reshape(()), dtype))
        return p

    # -- rewriting ------------------------------------------------------------------------------
    def apply(self) -> None:
        for node in self.plan.quantized_nodes:
            if node.op_type in self.target.ops.quantized:
                roles = input_roles(node)
                # The tensors, not arrays: a weight kept in its file (a model over 2 GB) stays there.
                kept = {i: node.inputs[i].const_value for i in (roles.weight, roles.bias) if i is not None and i < len(node.inputs) and node.inputs[i] is not None}
                kept = {i: a for i, a in kept.items() if a is not None}
                if roles.weight in kept and roles.bias is None and node.op_type in ("Conv", "ConvTranspose", "Gemm"):
                    kept[2] = None  # no bias: bias correction may add one (third input), the float layer has none
                self.float_inputs[node.name] = kept
        for act, producer in self.plan.fused.values():
            out = act.outputs[0]
            name = out.name
            out.replace_all_uses_with(producer.outputs[0], replace_graph_outputs=True)
            self.graph.remove(act, safe=True)
            # The producer's output now carries the activation's range; give it the activation's
            # name so it is matched with the float model's tensor of that name.
            producer.outputs[0].name = name
            self.plan.values[name] = producer.outputs[0]
        for name, value in list(self.plan.values.items()):
            self._quantize_activation(name, value)
        for node in self.plan.quantized_nodes:
            if node.op_type in self.target.ops.quantized:
                self._quantize_constants(node)
            elif node.op_type in self.target.ops.integer_passthrough:
                self._lower_to_integer(node)

    def _quantize_activation(self, name: str, value: ir.Value) -> None:
        p = self._activation_params(name)
        q = ir.Node("", "QuantizeLinear", [value, p.scale_value, p.zp_value], name=self.names.fresh(f"{name}_QuantizeLinear"))
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], p.scale_value, p.zp_value], name=self.names.fresh(f"{name}_DequantizeLinear"))
        q.outputs[0].name = self.names.fresh(f"{name}_quantized")
        q.outputs[0].dtype = ir.DataType(self._ir_dtype(self.target.activations.dtype))
        q.outputs[0].shape = value.shape
        nodes = [q, dq]
        if self.act_qrange != self.target.activations.qrange:
            clip = self._range_clip(name, q.outputs[0])
            dq.replace_input_with(0, clip.outputs[0])
            nodes = [q, clip, dq]
        deq = dq.outputs[0]
        deq.name = self.names.fresh(f"{name}_dequantized")
        deq.dtype, deq.shape = value.dtype, value.shape
        # On the node as well: the verifier matches tensors across models by node metadata.
        deq.metadata_props[SOURCE_KEY] = dq.metadata_props[SOURCE_KEY] = name
        for use in list(value.uses()):
            if use.node is not q:
                use.node.replace_input_with(use.idx, deq)
        if value.is_graph_output() and self.target.ops.quantize_graph_outputs:
            # The output keeps its name and becomes the dequantized tensor.
            outputs = self.graph.outputs
            outputs[[i for i, o in enumerate(outputs) if o is value][0]] = deq
            value.name, deq.name = self.names.fresh(f"{name}_float"), name
        # Otherwise a graph output stays the exact float tensor; only its consumers read the DQ.
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(self.graph[0], nodes)
        else:
            self.graph.insert_after(producer, nodes)
        self.dq_of[name] = deq

    def _range_clip(self, name: str, quantized: ir.Value) -> ir.Node:
        """Clip of the integer tensor to the narrow width's range: onnxruntime then dequantizes
        exactly the b-bit values the quantizer meant."""
        dtype = self.target.activations.dtype
        lo = self._initializer(f"{name}_qmin", self._as_qtype(np.asarray(self.act_qrange[0]), dtype))
        hi = self._initializer(f"{name}_qmax", self._as_qtype(np.asarray(self.act_qrange[1]), dtype))
        clip = ir.Node("", "Clip", [quantized, lo, hi], name=self.names.fresh(f"{name}_Clip"))
        out = clip.outputs[0]
        out.name = self.names.fresh(f"{name}_quantized_{self.act_bits}bit")
        out.dtype, out.shape = quantized.dtype, quantized.shape
        return clip

    def _quantize_constants(self, node: ir.Node) -> None:
        roles = input_roles(node)
        weight_scale = None
        if roles.weight is not None:
            stored = self._quantize_weight(node, roles.weight, roles.weight_axis, self._bias_scale_floor(node, roles))
            weight_scale = stored.channel_scale
            if node.name in self.input_means:
                self._correct_bias(node, stored.float_weight(), stored.dequantized())
                roles = input_roles(node)  # the node may have gained a bias input
        for i in roles.activations if self.target.activations.quantize else ():
            if i < len(node.inputs) and node.inputs[i] is not None and is_float_tensor(node.inputs[i]) and node.inputs[i].const_value is not None:
                self._quantize_constant_operand(node, i)
        if roles.bias is not None and self.target.bias.quantize and weight_scale is not None:
            bias = node.inputs[roles.bias] if len(node.inputs) > roles.bias else None
            x = node.inputs[roles.activations[0]]
            if bias is not None and constant_array(bias) is not None and x is not None and x.producer() is not None and x.producer().op_type == "DequantizeLinear":
                x_scale = constant_array(x.producer().inputs[1])
                self._quantize_bias(node, roles.bias, float(x_scale) * weight_scale)

    def _dequantized_constant(self, source: ir.Value, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: str, axis: int | None, block_size: int = 0) -> ir.Value:
        """Store ``q`` as a ``dtype`` initializer behind a DequantizeLinear; return the DQ output."""
        q_value = self._initializer(f"{source.name}_quantized", self._as_qtype(q, dtype))
        s_value = self._initializer(f"{source.name}_scale", np.asarray(scale, np.float32))
        z_value = self._initializer(f"{source.name}_zero_point", self._as_qtype(np.asarray(zp), dtype))
        attrs = {"axis": ir.Attr("axis", ir.AttributeType.INT, axis)} if axis is not None else {}
        if block_size:
            attrs["block_size"] = ir.Attr("block_size", ir.AttributeType.INT, block_size)
        dq = ir.Node("", "DequantizeLinear", [q_value, s_value, z_value], attributes=attrs, name=self.names.fresh(f"{source.name}_DequantizeLinear"))
        out = dq.outputs[0]
        out.name = self.names.fresh(f"{source.name}_dequantized")
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(list(q.shape))
        out.metadata_props[SOURCE_KEY] = dq.metadata_props[SOURCE_KEY] = source.name
        self.graph.insert_before(self.graph[0], dq)
        return out

    def _bias_scale_floor(self, node: ir.Node, roles) -> np.ndarray | None:
        """Per-channel lower bounds on the weight scale that keep this node's int32 bias in range."""
        if roles.bias is None or not self.target.bias.quantize or roles.bias >= len(node.inputs):
            return None
        bias = constant_array(node.inputs[roles.bias]) if node.inputs[roles.bias] is not None else None
        x = node.inputs[roles.activations[0]] if roles.activations else None
        dq = x.producer() if x is not None else None
        if bias is None or dq is None or dq.op_type != "DequantizeLinear" or (x_scale := constant_array(dq.inputs[1])) is None:
            return None
        return int32_bias_scale_floor(bias.reshape(-1), float(np.asarray(x_scale).reshape(-1)[0]))

    def _quantize_weight(self, node: ir.Node, index: int, axis: int | None, scale_floor: np.ndarray | None = None) -> _StoredWeight:
        """Replace weight input ``index`` by int weights behind a DequantizeLinear; return what was
        stored. ``scale_floor``: per-channel minimum scales (so that the int32 bias derived from
        them holds the bias)."""
        w_value = node.inputs[index]
        cached = self.weight_cache.get(id(w_value))
        if cached is not None:  # a weight shared by several nodes is quantized once
            node.replace_input_with(index, cached.dq_out)
            return cached
        source = w_value.const_value
        w = np.asarray(constant_array(w_value), np.float32)
        layout = weight_layout(node, w, self.target, axis)
        rule, ax, block = layout.rule, layout.axis, layout.block
        # A width chosen by assign-precision, stored in the weight dtype with its values limited
        # to the narrower range: the integer kernels then compute exactly the b-bit quantizer.
        bits = self.weight_bits.get(w_value.name, self.target.bits.default or rule.bits)
        dtype = self._weight_dtype(bits)
        rounded = self.rounded_weights.get(w_value.name)
        if rounded is not None and rounded.matches(w, ax, bits) and self._saturates(rounded, rule):
            # Codes a training pass chose on a grid this CPU's int16 pair sums overflow on (a fact
            # left by another target, or a hand-made one): rounded again on the pair-safe grid.
            self.notes.add(f"{node.name}: the trained codes of '{w_value.name}' would saturate this CPU's int16 pair sums; rounded on its pair-safe grid instead")
            rounded = None
        if rounded is not None and rounded.matches(w, ax, bits):
            # A training pass (adaround) chose each code on this very grid: store its codes.
            q, scale, zp = rounded.codes, rounded.grid.scale, rounded.grid.zero_point
            lo, hi = INTEGER_DTYPES.get(dtype, (-(2**62), 2**62))[:2]
            if q.size and (q.min() < lo or q.max() > hi):
                # fold-batchnorm negated a channel holding the type's lowest code (-128 in int8
                # became 128): one step less, the rest of the trained codes kept.
                self.notes.add(f"{node.name}: {int(np.sum((q < lo) | (q > hi)))} code(s) of '{w_value.name}' in a channel a BatchNormalization fold negated lie outside {dtype}: moved one step to its range")
                q = np.clip(q, lo, hi)
            w = source = rounded.float_weight  # the error bias correction measures is against the float weight
        else:
            q, scale, zp = quantize_weight(w, rule, bits, ax, self.weight_range)
        if scale_floor is not None and not block and not rule.is_float8 and (np.ndim(scale) == 0 or np.size(scale) == scale_floor.size):
            qmin, qmax = weight_qrange(rule, bits)
            q, scale, raised = raise_scales(w, q, scale, zp, scale_floor.reshape(np.shape(scale)) if np.ndim(scale) else scale_floor, qmin, qmax, ax)
            if raised:
                self.notes.add(f"{node.name}: {raised} weight channel(s) nearly all zero got a larger scale so that their int32 bias holds the bias")
        elif scale_floor is not None and not block and rule.is_float8 and (np.ndim(scale) == 0 or np.size(scale) == scale_floor.size):
            floor = scale_floor.reshape(np.shape(scale)) if np.ndim(scale) else np.max(scale_floor)
            if np.any(scale < floor):
                # A float8 weight's scale is free to grow: its exponent range absorbs it (values
                # move toward the subnormals), and the int32 bias then holds the bias. Left float,
                # the bias would be quantized by onnxruntime itself (its weight-bias quantization),
                # clipped.
                top = FLOAT8_DTYPES[rule.dtype]
                grown_count = int(np.sum(np.asarray(scale) < np.asarray(floor)))
                grown = np.maximum(scale, floor).astype(np.float32)
                q, scale, zp = quantize_float8(w, rule.dtype, (-grown * top, grown * top), ax)
                self.notes.add(f"{node.name}: {grown_count} float8 weight scale(s) grown so that the int32 bias holds the bias")
        dq_out = self._dequantized_constant(w_value, q, scale, zp, dtype, ax, block)
        for use in list(w_value.uses()):
            if use.node in self.plan.quantized_nodes and input_roles(use.node).weight == use.idx:
                use.node.replace_input_with(use.idx, dq_out)
        stored = _StoredWeight(dq_out, source, scale, zp, rule, ax, block)
        self.weight_cache[id(w_value)] = stored
        # The other quantized readers of a shared weight now read dq_out: found by it as well.
        self.weight_cache[id(dq_out)] = stored
        self._drop_if_unused(w_value)
        return stored

    @staticmethod
    def _saturates(rounded: RoundedWeight, rule) -> bool:
        """Whether two codes of one sign in a channel sum past the rule's int16 pair limit."""
        limit = rule.pair_sum_limit
        return limit is not None and bool(np.any(pair_sum_violations(np.asarray(rounded.codes, np.int64), rounded.grid.zero_point, rounded.grid.axis, limit)))

    def _weight_dtype(self, bits: int) -> str:
        """The ONNX integer type a ``bits``-wide weight is stored in: the smallest native width that
        holds it (int4 for 3 or 4 bits where the target runs int4), else the weight dtype."""
        dtype = storage_dtype(self.target, bits)
        if dtype != self.target.weights.dtype and opset_version(self.model) < 21:
            # DequantizeLinear takes 4- and 16-bit integers from opset 21 on.
            self.notes.add(f"{dtype} weights need opset 21 (the model has {opset_version(self.model)}; set min_opset = 21 in the target): stored as {self.target.weights.dtype}")
            return self.target.weights.dtype
        return dtype

    def _correct_bias(self, node: ir.Node, w: np.ndarray, deq: np.ndarray) -> None:
        """Give ``node`` a bias that cancels its quantized weight's mean output shift (a new
        initializer: the old bias may be shared with nodes whose inputs differ)."""
        bias = corrected_bias(node, self.model, self.input_means[node.name], w, deq)
        if bias is None:
            return
        roles = input_roles(node)
        old = node.inputs[roles.bias] if roles.bias is not None else None
        base = old.name if old is not None else f"{node.name}_bias"
        value = self._initializer(f"{base}_corrected", bias)
        value.metadata_props[SOURCE_KEY] = base
        if old is None:
            node.resize_inputs(3)  # Conv/ConvTranspose/Gemm take the bias third
            node.replace_input_with(2, value)
        else:
            node.replace_input_with(roles.bias, value)
            self._drop_if_unused(old)
        self.bias_corrected += 1

    def _quantize_bias(self, node: ir.Node, index: int, scale: np.ndarray) -> None:
        b_value = node.inputs[index]
        b = constant_array(b_value).astype(np.float64)
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), b.shape).astype(np.float32)
        lo, hi = INTEGER_DTYPES["int32"][:2]
        ratio = np.rint(b / scale.astype(np.float64))
        if not np.all(np.isfinite(ratio)) or np.any(ratio < lo) or np.any(ratio > hi):
            # Clipping would change the bias in silence: it stays float, and the report says so.
            worst = float(np.nanmax(np.abs(b / scale.astype(np.float64))))
            self.notes.add(f"{node.name}: its bias does not fit int32 at input scale x weight scale (it would need {worst:.3g} steps; int32 holds {hi}): kept float")
            return
        q = ratio.astype(np.int32)
        per_channel = q.ndim == 1 and q.size > 1 and not np.all(scale == scale.reshape(-1)[0])
        if not per_channel:
            scale = scale.reshape(-1)[:1].reshape(())
        zp = np.zeros(scale.shape, dtype=np.int32)
        node.replace_input_with(index, self._dequantized_constant(b_value, q, scale, zp, self.target.bias.dtype, 0 if per_channel else None))
        self._drop_if_unused(b_value)

    def _quantize_constant_operand(self, node: ir.Node, index: int) -> None:
        """A constant input of Add/Mul/Concat: quantized per tensor with the activation dtype."""
        c_value = node.inputs[index]
        c = constant_array(c_value).astype(np.float32)
        rule = self.target.activations
        qmin, qmax = self.act_qrange
        if rule.is_float8:
            q, scale, zp = quantize_float8(c, rule.dtype, (np.asarray(c.min()), np.asarray(c.max())), None)
        else:
            scale, zp = affine_params(c.min(), c.max(), qmin, qmax, rule.symmetric)
            q = quantize(c, scale, zp, qmin, qmax)
        node.replace_input_with(index, self._dequantized_constant(c_value, q, scale.reshape(()), zp.reshape(()), rule.dtype, None))
        self._drop_if_unused(c_value)

    def _lower_to_integer(self, node: ir.Node) -> None:
        """DQ -> op -> Q with one scale on both sides becomes op on the integer tensor, then DQ.

        Exact: data movement commutes with an affine map that has the same scale and zero point
        on both sides, provided a Pad's fill value is itself exactly representable.
        """
        x_dq, out = node.inputs[0], node.outputs[0]
        dq, consumers = x_dq.producer() if x_dq is not None else None, out.consumers()
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear":
            return
        q_out = consumers[0]
        if dq.inputs[1] is not q_out.inputs[1] or dq.inputs[2] is not q_out.inputs[2]:
            return  # not one shared scale: the op would need requantizing
        fill = None
        mode = node.attributes["mode"].as_string() if "mode" in node.attributes else "constant"
        if node.op_type == "Pad" and mode == "constant":
            # The fill is a float value: on the integer tensor it must be that value's code. An
            # omitted fill is 0.0, whose code is the zero point, not the code 0 (which stands for
            # -zero_point x scale: a Pad after a shifted ReLU would pad with a negative value).
            value = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros((), np.float32)
            p = self._activation_params(out.name)
            qmin, qmax = self.act_qrange
            if value is None:
                return
            q = quantize(np.asarray(value, np.float32), p.scale, p.zero_point, qmin, qmax)
            if not np.allclose(dequantize(q, p.scale, p.zero_point), value, rtol=0, atol=0):
                return
            fill = self._initializer(f"{node.name}_fill", self._as_qtype(q.reshape(()), self.target.activations.dtype))
        node.replace_input_with(0, dq.inputs[0])
        if fill is not None:
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, fill)
        out.dtype = q_out.outputs[0].dtype
        q_out.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        self.graph.remove(q_out, safe=True)
        if not x_dq.uses() and not x_dq.is_graph_output():
            self.graph.remove(dq, safe=True)

    # -- helpers --------------------------------------------------------------------------------
    def _initializer(self, base: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
        return add_initializer(self.graph, self.names, base, array)

    @staticmethod
    def _ir_dtype(dtype: str) -> ir.DataType:
        return IR_TYPES[dtype]

    def _as_qtype(self, array: np.ndarray, dtype: str) -> ir.TensorProtocol:
        return stored_tensor(array, dtype)

    def _drop_if_unused(self, value: ir.Value) -> None:
        if not value.uses() and value.name in self.graph.initializers and not value.is_graph_input() and not value.is_graph_output():
            self.graph.initializers.pop(value.name)
