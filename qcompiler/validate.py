"""`qc validate`: check a quantized ONNX model (ours or another tool's) against a target's rules.

Each rule reads the target description, never its name. A violation names the node, its op, the
rule broken and a one-line fix. The checks follow the QDQ convention every backend here reads: a
QuantizeLinear -> DequantizeLinear pair on each quantized activation, integer weights and biases
behind a DequantizeLinear, integer ops (Clip to a narrower width, data movement) allowed between
a QuantizeLinear and its DequantizeLinear.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.cost_model import storage_dtype
from qcompiler.ir import constant_array, opset_version
from qcompiler.quant.pair_limit import max_pair_sum
from qcompiler.format_metadata import FORMAT_KEY, format_violations
from qcompiler.op_roles import InputRoles, input_roles
from qcompiler.quant.weights import block_axis
from qcompiler.targets.spec import FLOAT_WIDTH, INTEGER_BITS, INTEGER_DTYPES, IR_TYPES, TargetSpec, TensorRule

#: Every rule `validate` checks, with what it means (printed by ``qc validate --rules``).
RULES: dict[str, str] = {
    "opset": "the model's opset is at least the target's min_opset",
    "dtype": "each Q/DQ uses an integer type the target accepts for that tensor (activation, weight, bias)",
    "symmetric": "zero points sit at the middle of the range where the target asks for symmetric quantization",
    "granularity": "weights are per-channel or per-tensor (or per-block) as the target says; activations per-tensor",
    "axis": "per-channel weight scales lie along the consuming op's output-channel axis",
    "qdq-pair": "every QuantizeLinear is dequantized, every activation DequantizeLinear comes from a QuantizeLinear with the same scale and zero point, and a quantized op has all its activation inputs quantized",
    "float-weight": "an op the target quantizes whose activation input is quantized has its weight quantized too (an integer or float8 constant behind a DequantizeLinear), unless the target lets layers stay float (32 in bits.allowed, with a float fallback)",
    "shared-scale": "inputs and output of ops that move bytes without requantizing (Concat) share one scale and zero point",
    "bias": "a quantized bias has scale = input scale x weight scale and zero point 0; it is quantized exactly when the target quantizes biases",
    "unsupported-op": "ops on integer tensors are ones the target runs on integers; without a float fallback, every op reading quantized data is one the target quantizes",
    "fusion": "no Q/DQ pair between a quantized op and the activation the target fuses into it",
    "saturation": "where the CPU compiled for adds pairs of uint8 x int8 products in int16 ([cpu] accumulation), no two weights of one sign in an output channel sum to more than the int16 limit allows (128)",
    "format": "a DequantizeLinear's qc.format metadata names a number format its storage type holds, and the stored values (or the Clip before it) lie in that format",
    "embedding": "an embedding table stored as integers (Gather of an integer constant, then Cast; or GatherBlockQuantized) has the type, block size and lowering of the target's [embeddings]",
}

_FIXES: dict[str, str] = {
    "opset": "upgrade the model (onnx.version_converter, or qc compile, which upgrades it)",
    "dtype": "re-quantize this tensor with the accepted type",
    "symmetric": "re-quantize with symmetric ranges (zero point at the middle of the integer range)",
    "granularity": "re-quantize this weight with the target's granularity",
    "axis": "re-quantize this weight per channel along the output-channel axis",
    "qdq-pair": "insert the missing QuantizeLinear/DequantizeLinear or remove the stray one",
    "float-weight": "store the weight as a quantized constant behind a DequantizeLinear (re-run qc compile); to keep the layer float, dequantize its input before it instead",
    "shared-scale": "give all inputs and the output of this op one scale and zero point (quantize them as one group)",
    "bias": "quantize the bias to int32 with scale = input scale x weight scale, zero point 0 (or keep it float where the target fuses float biases)",
    "unsupported-op": "move the op out of the quantized region (dequantize before it) or choose a target that runs it quantized",
    "fusion": "remove the Q/DQ pair between the op and its activation; quantize after the activation",
    "saturation": "re-compile for this CPU (qc compile --target ort-cpu, or --cpu ISA), which narrows each channel just enough; or quantize with 7-bit weights (onnxruntime: reduce_range=True)",
    "format": "re-quantize the tensor into the format its qc.format names, or correct the metadata (qc compile writes it)",
    "embedding": "re-compile for this target (quantize-embeddings stores tables as its [embeddings] says), or keep the table float",
}


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node."""

    rule: str
    node: str
    op_type: str
    message: str

    @property
    def fix(self) -> str:
        return _FIXES[self.rule]

    def to_dict(self) -> dict[str, str]:
        return {**asdict(self), "fix": self.fix}


_NAMES = {ir_type: name for name, ir_type in IR_TYPES.items()}


def _dtype_name(dtype: ir.DataType | None) -> str | None:
    if dtype is None:
        return None
    return _NAMES.get(dtype) or dtype.name.lower()


def _value_dtype(value: ir.Value | None) -> ir.DataType | None:
    """A value's element type; for an initializer without a declared type, its tensor's."""
    if value is None:
        return None
    if value.dtype is None and value.const_value is not None:
        return value.const_value.dtype
    return value.dtype


def _is_integer(value: ir.Value | None) -> bool:
    return _value_dtype(value) in INTEGER_BITS


#: Full-precision float types. Float8 is a storage type read through a DequantizeLinear, not one.
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
#: Ops that hand a weight on unchanged in value (copy, cast, relayout): a float constant seen through
#: them is still a float weight. Q/DQ and anything that computes (a custom Quant node) end the walk.
_WEIGHT_CARRIERS = frozenset({"Identity", "Cast", "CastLike", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Tile"})


def _float_constant_source(value: ir.Value | None, depth: int = 0) -> ir.Value | None:
    """The float constant ``value`` is, or is carried from through copy/cast/relayout ops; else None.

    An initializer or a Constant node of a float type counts; a DequantizeLinear, a graph input or
    any computing op does not (their outputs are quantized or computed at run time).
    """
    if value is None or depth > 16:
        return None
    if value.const_value is not None:
        return value if value.const_value.dtype in _FLOAT_TYPES else None
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    if producer.op_type == "Constant":
        if "value" in producer.attributes:
            return value if producer.attributes["value"].as_tensor().dtype in _FLOAT_TYPES else None
        return value if any(name in producer.attributes for name in ("value_float", "value_floats")) else None
    if producer.op_type not in _WEIGHT_CARRIERS or not producer.inputs:
        return None
    # Shapes, axes and starts (the other inputs) must be constant too, or the weight is computed.
    if any(v is not None and v.const_value is None and not _Checker._is_constant(v) for v in producer.inputs[1:]):
        return None
    return _float_constant_source(producer.inputs[0], depth + 1)


@dataclass
class _QParams:
    """Scale, zero point and integer type of one Q or DQ node (None where not constant)."""

    scale: np.ndarray | None
    zero_point: np.ndarray | None
    dtype: str | None
    axis: int
    block_size: int


def _qparams(node: ir.Node) -> _QParams:
    scale = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = constant_array(zp_value) if zp_value is not None else None
    if zp_value is not None:
        dtype = _dtype_name(_value_dtype(zp_value))
    elif node.op_type == "DequantizeLinear":
        dtype = _dtype_name(_value_dtype(node.inputs[0]))
    else:
        attr = node.attributes.get("output_dtype")
        dtype = _dtype_name(ir.DataType(attr.as_int())) if attr is not None and attr.as_int() else "uint8"
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    block = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
    return _QParams(
        None if scale is None else np.asarray(scale, np.float64),
        None if zp is None else np.asarray(zp, np.int64) if zp.dtype.kind in "iu" else np.asarray(zp, np.float64),
        dtype,
        axis,
        block,
    )


def _same(a: _QParams, b: _QParams) -> bool:
    if a.scale is None or b.scale is None:
        return True  # computed at run time: cannot be compared here
    za = np.zeros(1) if a.zero_point is None else a.zero_point
    zb = np.zeros(1) if b.zero_point is None else b.zero_point
    return a.scale.shape == b.scale.shape and np.array_equal(a.scale, b.scale) and np.array_equal(np.broadcast_to(za, a.scale.shape), np.broadcast_to(zb, b.scale.shape))


def _symmetric_zero_point(dtype: str) -> int:
    qmin, qmax, _, _ = INTEGER_DTYPES[dtype]
    return int(np.ceil((qmin + qmax) / 2.0))


class _Checker:
    def __init__(self, model: ir.Model, target: TargetSpec) -> None:
        self.model = model
        self.target = target
        self.violations: list[Violation] = []
        self.nodes = list(model.graph)

    def add(self, rule: str, node: ir.Node | None, message: str) -> None:
        name = (node.name or f"<{node.op_type} #{self.nodes.index(node)}>") if node is not None else "<model>"
        self.violations.append(Violation(rule, name, node.op_type if node is not None else "", message))

    # -- where each Q/DQ belongs --------------------------------------------------------------
    @staticmethod
    def _is_constant(value: ir.Value | None) -> bool:
        if value is None:
            return False
        if value.const_value is not None:
            return True
        producer = value.producer()
        return producer is not None and producer.op_type == "Constant"

    def _source_quantizer(self, value: ir.Value) -> ir.Node | None:
        """The QuantizeLinear an integer activation comes from, through integer-only ops."""
        seen = 0
        while value is not None and seen < 64:
            producer = value.producer()
            if producer is None:
                return None
            if producer.op_type == "QuantizeLinear":
                return producer
            if not producer.inputs or not _is_integer(producer.inputs[0]):
                return None
            value, seen = producer.inputs[0], seen + 1
        return None

    def _dequantized(self, value: ir.Value, depth: int = 0) -> bool:
        """Whether an integer value reaches a DequantizeLinear, through integer-only ops."""
        for consumer in value.consumers():
            if consumer.op_type == "DequantizeLinear":
                return True
            if depth < 64 and consumer.outputs and _is_integer(consumer.outputs[0]) and self._dequantized(consumer.outputs[0], depth + 1):
                return True
        return False

    @staticmethod
    def _activation_dq(value: ir.Value | None) -> ir.Node | None:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear" and not _Checker._is_constant(producer.inputs[0]):
            return producer
        return None

    def _weight_dq(self, value: ir.Value | None) -> ir.Node | None:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear" and self._is_constant(producer.inputs[0]):
            return producer
        return None

    # -- the rules -------------------------------------------------------------------------------
    def run(self) -> list[Violation]:
        opset = opset_version(self.model)
        if opset < self.target.min_opset:
            self.add("opset", None, f"opset {opset} is below the target's minimum {self.target.min_opset}")
        roles_of: dict[int, str] = {}  # id(weight/bias DQ) -> role, from their consumers
        for node in self.nodes:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            self._check_consumer(node, roles_of)
        for node in self.nodes:
            if node.op_type != "DequantizeLinear" and FORMAT_KEY in node.metadata_props:
                for problem in format_violations(node):
                    self.add("format", node, problem)
            if node.op_type in ("Gather", "GatherBlockQuantized"):
                self._check_embedding(node)
            if node.op_type == "QuantizeLinear":
                self._check_quantizer(node)
            elif node.op_type == "DequantizeLinear":
                for problem in format_violations(node):
                    self.add("format", node, problem)
                if self._is_constant(node.inputs[0]):
                    self._check_constant_dq(node, roles_of.get(id(node)))
                else:
                    self._check_activation_dq(node)
        return self.violations

    def _check_embedding(self, node: ir.Node) -> None:
        """A table stored as integers and gathered as such, against the target's [embeddings]."""
        table = node.inputs[0] if node.inputs else None
        if table is None or not self._is_constant(table) or not _is_integer(table):
            return
        if node.op_type == "GatherBlockQuantized":
            if node.domain != "com.microsoft":
                return
            lowering = "gather-block-quantized"
        elif node.domain in ("", "ai.onnx") and any(c.op_type == "Cast" for c in node.outputs[0].consumers()):
            lowering = "gather-cast-mul"
        else:
            return  # integer data gathered for its own sake (shapes, ids), not a dequantized table
        how = self.target.embeddings
        dtype = _dtype_name(_value_dtype(table))
        if how is None:
            self.add("embedding", node, f"table '{table.name}' is stored as {dtype}; target '{self.target.name}' keeps embedding tables float (no [embeddings])")
        elif how.lowering != lowering:
            self.add("embedding", node, f"table '{table.name}' is read by {lowering}; target '{self.target.name}' reads tables by {how.lowering}")
        elif dtype != how.rule.dtype:
            self.add("embedding", node, f"table '{table.name}' is stored as {dtype}; target '{self.target.name}' stores tables as {how.rule.dtype}")
        elif lowering == "gather-block-quantized" and (block := node.attributes["block_size"].as_int() if "block_size" in node.attributes else 128) != how.rule.block_size:
            self.add("embedding", node, f"table '{table.name}' has blocks of {block}; target '{self.target.name}' uses {how.rule.block_size}")

    def _check_quantizer(self, node: ir.Node) -> None:
        p = _qparams(node)
        self._check_activation_params(node, p)
        if not node.outputs[0].is_graph_output() and not self._dequantized(node.outputs[0]):
            self.add("qdq-pair", node, f"the output '{node.outputs[0].name}' is never dequantized")

    def _check_activation_params(self, node: ir.Node, p: _QParams) -> None:
        rule = self.target.activations
        if not rule.quantize:
            self.add("dtype", node, f"activation quantized to {p.dtype}; target '{self.target.name}' keeps activations float (weight-only)")
        elif p.dtype not in rule.accepted:
            self.add("dtype", node, f"activation type {p.dtype}; target '{self.target.name}' accepts {', '.join(rule.accepted)}")
        elif rule.symmetric and p.zero_point is not None and p.dtype in INTEGER_DTYPES and np.any(p.zero_point != _symmetric_zero_point(p.dtype)):
            self.add("symmetric", node, f"activation zero point {_fmt(p.zero_point)}; the target's activations are symmetric (zero point {_symmetric_zero_point(p.dtype)})")
        if p.scale is not None and p.scale.size > 1:
            self.add("granularity", node, f"activation scale has {p.scale.size} values; the target quantizes activations per tensor")

    def _check_activation_dq(self, node: ir.Node) -> None:
        p = _qparams(node)
        source = self._source_quantizer(node.inputs[0])
        if source is None:
            self.add("qdq-pair", node, f"its input '{node.inputs[0].name}' does not come from a QuantizeLinear")
            self._check_activation_params(node, p)
        elif not _same(p, _qparams(source)):
            self.add("qdq-pair", node, f"its scale/zero point differ from those of its QuantizeLinear '{source.name}'")

    def _check_constant_dq(self, node: ir.Node, role: str | None) -> None:
        p = _qparams(node)
        if role == "bias":
            if not self.target.bias.quantize:
                self.add("bias", node, f"the bias is quantized ({p.dtype}); target '{self.target.name}' keeps biases float and fuses them into the layer")
            elif p.dtype != self.target.bias.dtype:
                self.add("dtype", node, f"bias type {p.dtype}; the target wants {self.target.bias.dtype}")
            return
        if role != "weight":
            return  # a constant operand of Add/Mul/Concat: quantized like an activation by convention
        rule = self.target.weights
        if p.dtype not in self._weight_dtypes():
            self.add("dtype", node, f"weight type {p.dtype}; target '{self.target.name}' accepts {', '.join(self._weight_dtypes())}")
        elif rule.symmetric and p.zero_point is not None and p.dtype in INTEGER_DTYPES and np.any(p.zero_point != _symmetric_zero_point(p.dtype)):
            self.add("symmetric", node, f"weight zero points {_fmt(p.zero_point)}; the target's weights are symmetric (zero point {_symmetric_zero_point(p.dtype)})")

    def _weight_dtypes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.target.weights.accepted, *(storage_dtype(self.target, b) for b in self.target.bits.native))))

    def _check_consumer(self, node: ir.Node, roles_of: dict[int, str]) -> None:
        """Rules about an op reading quantized data: its weights, bias, inputs and scales."""
        if node.domain not in ("", "ai.onnx"):
            return
        roles = input_roles(node)
        if node.op_type == "MatMul" and (b_dq := self._weight_dq(node.inputs[1])) is not None:
            # A quantized MatMul's weight is a DequantizeLinear output, not a constant.
            roles = InputRoles(activations=(0,), weight=1, weight_axis=np.ndim(constant_array(b_dq.inputs[0])) - 1)
        elif node.op_type == "MatMul" and roles.weight is None and len(node.inputs) > 1 and _float_constant_source(node.inputs[1]) is not None:
            # A float constant behind an Identity or Reshape is still a weight, not a second activation.
            roles = InputRoles(activations=(0,), weight=1)
        acts = [
            node.inputs[i]
            for i in roles.activations
            if i < len(node.inputs) and node.inputs[i] is not None and (node.inputs[i].dtype == ir.DataType.FLOAT or self._activation_dq(node.inputs[i]) is not None)
        ]
        act_dqs = [self._activation_dq(v) for v in acts]
        weight = node.inputs[roles.weight] if roles.weight is not None and roles.weight < len(node.inputs) else None
        w_dq = self._weight_dq(weight)
        bias = node.inputs[roles.bias] if roles.bias is not None and roles.bias < len(node.inputs) else None
        b_dq = self._weight_dq(bias)
        if w_dq is not None:
            roles_of[id(w_dq)] = "weight"
        if b_dq is not None:
            roles_of[id(b_dq)] = "bias"
        op = node.op_type
        quantized_input = any(dq is not None for dq in act_dqs)
        if op in self.target.ops.quantized and quantized_input:
            # Where the backend falls back to float, a weightless op reading one quantized and one
            # float activation runs in float on purpose (insert-qdq keeps an attention product float
            # when only a float Softmax reads it); a layer with a weight does not.
            weightless_fallback = self.target.ops.float_fallback and w_dq is None and weight is None
            for value, dq in zip(acts, act_dqs):
                # A constant operand stored quantized (Add's bias, BatchNorm's scale) is quantized data too.
                if dq is None and not self._is_constant(value) and self._weight_dq(value) is None and not weightless_fallback:
                    self.add("qdq-pair", node, f"input '{value.name}' is float while the other inputs are quantized: {op} cannot run quantized")
            if w_dq is None:
                self._check_float_weight(node, weight, next(v for v, dq in zip(acts, act_dqs) if dq is not None))
        if w_dq is not None:
            self._check_weight_granularity(node, w_dq, roles.weight_axis)
            if quantized_input and op in self.target.ops.quantized:
                self._check_pair_sums(node, w_dq, roles.weight_axis)
        if b_dq is not None and w_dq is not None and act_dqs and act_dqs[0] is not None and self.target.bias.quantize:
            self._check_bias_scale(node, b_dq, act_dqs[0], w_dq)
        elif bias is not None and b_dq is None and self._is_constant(bias) and w_dq is not None and quantized_input and self.target.bias.quantize and op in self.target.ops.quantized:
            self.add("bias", node, f"bias '{bias.name}' is float; target '{self.target.name}' runs {op} with an {self.target.bias.dtype} bias")
        if op in self.target.ops.shared_scale and quantized_input:
            self._check_shared_scale(node, act_dqs)
        ops = self.target.ops
        integer_inputs = [v for v in node.inputs if _is_integer(v) and self._source_quantizer(v) is not None]
        if integer_inputs and op != "Clip" and op not in ops.integer_passthrough:
            # Clip narrows a width inside its integer type; other ops on Q's integers must be ones
            # the backend runs on integers.
            self.add("unsupported-op", node, f"{op} reads the integer tensor '{integer_inputs[0].name}'; target '{self.target.name}' runs {op} on integers only if it is in ops.integer_passthrough")
        # Shape and Size read a tensor's dimensions, not its values.
        if quantized_input and not ops.float_fallback and op not in (*ops.quantized, *ops.passthrough, *ops.fused_activations, "Shape", "Size"):
            self.add("unsupported-op", node, f"{op} reads quantized data; target '{self.target.name}' cannot run {op} quantized and has no float fallback")
        if ops.activation_fusion == "keep" and op in ops.fused_activations and quantized_input:
            source = self._source_quantizer(act_dqs[0].inputs[0]) if act_dqs[0] is not None else None
            producer = source.inputs[0].producer() if source is not None else None
            if producer is not None and producer.op_type in ops.quantized:
                self.add("fusion", node, f"a Q/DQ pair between {producer.op_type} '{producer.name}' and this {op} keeps target '{self.target.name}' from fusing them")

    def _check_float_weight(self, node: ir.Node, weight: ir.Value | None, activation: ir.Value) -> None:
        """A quantized op reading a quantized activation with a float weight: a layer left half
        quantized (the weight's DequantizeLinear replaced or never inserted)."""
        source = _float_constant_source(weight)
        if source is None or not self.target.activations.quantize:
            return  # no weight, a weight computed at run time, or a weight-only target's float activation
        ops = self.target.ops
        # 32 among the allowed widths is how a target lets assign-precision leave a layer float;
        # the layer then reads a dequantized input, which a backend with a float fallback runs.
        if ops.float_fallback and FLOAT_WIDTH in self.target.bits.allowed:
            return
        carried = f" (through {weight.producer().op_type})" if source is not weight else ""
        why = "and has no float fallback" if not ops.float_fallback else "and does not let layers stay float (no 32 in bits.allowed)"
        accepted = "/".join(self._weight_dtypes())
        self.add(
            "float-weight",
            node,
            f"weight '{source.name}'{carried} is float while input '{activation.name}' is quantized: target '{self.target.name}' runs {node.op_type} on {accepted} weights behind a DequantizeLinear {why}",
        )

    def _check_pair_sums(self, node: ir.Node, w_dq: ir.Node, axis: int | None) -> None:
        """Weights that can overflow the int16 pair sums of the CPU compiled for (VPMADDUBSW)."""
        limit = self.target.weights.pair_sum_limit
        machine = self.target.machine
        stored = constant_array(w_dq.inputs[0])
        if not limit or machine is None or stored is None or stored.dtype.kind != "i" or stored.dtype.itemsize != 1:
            return
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        if machine.depthwise_exact and node.op_type == "Conv" and stored.ndim >= 3 and stored.shape[1] == 1 and group == stored.shape[0] > 1:
            return  # depthwise: a kernel of its own that accumulates exactly
        channel_axis = axis if axis is not None and stored.ndim > 1 else None
        worst = max_pair_sum(stored, channel_axis)
        if worst > limit:
            self.add("saturation", w_dq, f"weight of {node.op_type} '{node.name}' has two same-sign values summing to {worst} (> {limit}): on {machine.isa} onnxruntime's int8 kernels add pairs of products in int16 and saturate")

    def _check_weight_granularity(self, node: ir.Node, w_dq: ir.Node, axis: int | None) -> None:
        p = _qparams(w_dq)
        if p.scale is None:
            return
        rule: TensorRule = self.target.weights
        stored = constant_array(w_dq.inputs[0])
        shape = stored.shape if stored is not None else None
        rank = len(shape) if shape is not None else None
        channels = shape[axis] if shape is not None and axis is not None and axis < len(shape) else None
        if p.block_size:
            kind = "per-block"
        elif p.scale.size > 1 or (channels == 1 and p.scale.ndim == 1 and rule.granularity == "per-channel"):
            kind = "per-channel"
        else:
            kind = "per-tensor"
        wanted = rule.granularity
        if kind != wanted and not (wanted == "per-channel" and (channels == 1 or axis is None)):
            self.add("granularity", w_dq, f"weight of {node.op_type} '{node.name}' is quantized {kind}; target '{self.target.name}' wants {wanted}")
            return
        if kind == "per-channel" and axis is not None and rank:
            dq_axis = p.axis % rank
            if dq_axis != axis:
                self.add("axis", w_dq, f"per-channel scales on axis {dq_axis}; the output channels of {node.op_type} '{node.name}' lie on axis {axis}")
        if kind == "per-block" and axis is not None and rank:
            wanted_axis = block_axis(node, axis, rank)
            if p.axis % rank != wanted_axis:
                self.add("axis", w_dq, f"blocks along axis {p.axis % rank}; the reduction axis of {node.op_type} '{node.name}' is {wanted_axis}")
            elif p.block_size != rule.block_size:
                self.add("granularity", w_dq, f"blocks of {p.block_size}; target '{self.target.name}' wants blocks of {rule.block_size}")

    def _check_bias_scale(self, node: ir.Node, b_dq: ir.Node, x_dq: ir.Node, w_dq: ir.Node) -> None:
        b, x, w = _qparams(b_dq), _qparams(x_dq), _qparams(w_dq)
        if b.scale is None or x.scale is None or w.scale is None:
            return
        expected = (x.scale.reshape(-1)[0] * w.scale.reshape(-1)).astype(np.float32)
        got = np.broadcast_to(b.scale.reshape(-1), expected.shape) if b.scale.size in (1, expected.size) else None
        if got is None or not np.allclose(got, expected, rtol=1e-5, atol=0):
            worst = float(np.max(np.abs(got / expected - 1))) if got is not None else float("nan")
            self.add("bias", b_dq, f"bias scale of {node.op_type} '{node.name}' is not input scale x weight scale (largest relative difference {worst:.3g})")
        elif b.zero_point is not None and np.any(b.zero_point != 0):
            self.add("bias", b_dq, f"bias zero point of {node.op_type} '{node.name}' is {_fmt(b.zero_point)}, not 0")

    def _check_shared_scale(self, node: ir.Node, act_dqs: list[ir.Node | None]) -> None:
        params = [_qparams(dq) for dq in act_dqs if dq is not None]
        quantizers = [c for v in node.outputs if v is not None for c in v.consumers() if c.op_type == "QuantizeLinear"]
        params += [_qparams(q) for q in quantizers]
        if any(not _same(params[0], p) for p in params[1:]):
            scales = sorted({float(p.scale.reshape(-1)[0]) for p in params if p.scale is not None})
            self.add("shared-scale", node, f"{len(params)} quantized inputs/outputs use {len(scales)} different scales ({', '.join(f'{s:.4g}' for s in scales[:4])}{', ...' if len(scales) > 4 else ''})")


def _fmt(array: np.ndarray) -> str:
    values = np.unique(array)
    return ", ".join(str(v) for v in values[:4]) + (", ..." if values.size > 4 else "")


def validate(model: ir.Model, target: TargetSpec) -> list[Violation]:
    """Every violation of ``target``'s rules in ``model``, in graph order of the checks."""
    return _Checker(model, target).run()
