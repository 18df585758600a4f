"""The compiled QDQ model rewritten in QONNX, the dialect FINN and hls4ml read.

onnxruntime needs quantization spelled with standard ops: QuantizeLinear -> DequantizeLinear,
with a Clip between them when a width is narrower than its integer type ("QCDQ"; int8, or int16
for widths up to 16 at opset 21), and integer or float8 weights behind a DequantizeLinear. FINN
reads none of that: it wants the custom ``Quant`` op of the ``qonnx.custom_op.general`` domain
(opset 1), ``Quant(x, scale, zeropt, bitwidth)`` with attributes ``signed``, ``narrow`` and
``rounding_mode``, computing
``y = (clamp(round(x / scale + zeropt), qmin, qmax) - zeropt) * scale``
(fastmachinelearning/qonnx, docs/qonnx-custom-ops/intquant_v1.md), on float weights as well as on
activations. This module writes the same numerics that way, so ``model.qonnx.onnx`` and
``model.onnx`` compute the same outputs:

- each activation QuantizeLinear -> [Clip(lo, hi)] -> DequantizeLinear chain becomes one Quant;
  its bit-width, ``signed`` and ``narrow`` are read off the integer range the chain enforces (the
  Clip's, else the QuantizeLinear type's). Rounding is half-to-even in both (``"ROUND"``).
  FINN converts a Quant after a Relu only when it is unsigned and not narrow, and the others only
  when signed (finn/transformation/qonnx/qonnx_activation_handlers.py); since a Relu's output is
  >= 0, a signed b-bit Quant with zero point 0 after it is written as the identical unsigned
  (b-1)-bit one: both give clamp(round(x / scale), 0, 2^(b-1) - 1) x scale.
- each weight (an integer initializer behind a DequantizeLinear) becomes a float initializer
  holding exactly ``(q - zero point) x scale`` followed by a Quant whose scale is shaped to
  broadcast along the DequantizeLinear's axis, so the Quant reproduces those values bit for bit
  (``round(q x s / s) == q`` in float32 for any |q| < 2^21). The width is the one assign-precision
  chose for the weight (``weight_bits``, keyed by the weight's ``qc.source`` name), else the
  integer type's; ``narrow`` is the target's weight rule.
- a 1-bit weight (integers -1 and +1, zero point 0: `qcompiler.sensitivity.quantize_bipolar`)
  becomes its float values followed by ``BipolarQuant(x, scale)`` (same domain, opset 1; no
  attributes), which computes ``where(x >= 0, +1, -1) x scale``
  (docs/qonnx-custom-ops/bipolarquant_v1.md): with scale > 0 those are again exactly the values,
  and 0 would map to +1, as the quantizer maps it. The scale broadcasts as a Quant's does. A
  Quant cannot say this: its 1-bit signed range is {-1, 0} (narrow: {0}).
- float8 quantizers (float8e4m3fn or float8e5m2 QuantizeLinear -> DequantizeLinear chains and
  float8 weights behind a DequantizeLinear, opset 19) become ``FloatQuant(x, scale,
  exponent_bitwidth, mantissa_bitwidth, exponent_bias, max_val)`` nodes (same domain, opset 1;
  docs/qonnx-custom-ops/floatquant_v1.md, src/qonnx/custom_op/general/floatquant.py), which
  compute x / scale rounded half-to-even to the minifloat with that exponent and mantissa width
  and exponent bias (subnormals included: the smallest step is 2^(1 - bias - mantissa)), clamped
  to +-max_val, times scale. E4M3FN is (4, 3, 7, 448), E5M2 (5, 2, 15, 57344): max_val is the
  largest finite value, below what the widths alone give (480, 114688) because E4M3FN spends its
  top code on NaN and E5M2 its top exponent on inf/NaN. QuantizeLinear to float8 saturates
  (``saturate = 1``, the only mode written here) and rounds half-to-even, so FloatQuant gives the
  same values bit for bit. The attributes describe the format to backends and do not change the
  computation: ``has_inf`` (named so in qonnx's implementation, which requires it; the spec page
  calls it ``has_infinity``), ``has_nan``, ``has_subnormal`` = 1, ``saturation`` = 1,
  ``rounding_mode`` = "ROUND", as Brevitas exports its FP8 quantizers
  (src/qonnx/data/onnx/floatquant_exec/qonnx_act_weight_fp8.onnx). A float8 weight becomes its
  float values (``float8 x scale``, what DequantizeLinear computes) followed by a FloatQuant
  whose scale is shaped as a Quant's; ``value / scale`` in float32 lies within a float32 rounding
  of the float8 value, so the FloatQuant rounds it back exactly. There is no ``signed``: FloatQuant
  is always signed, so no unsigned rewrite after a Relu either. FINN's streamlining converts
  Quant nodes only; FloatQuant is for hls4ml and the qonnx tools.
- an int32 bias behind a DequantizeLinear is written as its dequantized float values with no
  Quant: FINN moves a bias into an Add (ExtractBiasFromConv) and absorbs float Adds into the next
  activation's thresholds; Brevitas layers, which produce most QONNX models, default to a float
  bias (``bias_quant=None``) too.

Every Quant gets its own scale, zero-point and bit-width initializers (float32, as Brevitas
exports them): FINN's transformations rewrite a Quant's parameter initializers in place, which
would corrupt another Quant sharing them. The rewrite runs on a copy; ``model`` is not changed.
Shapes are left as compiled: FINN needs a fixed batch size, which qonnx's own
``qonnx-cleanup --override-inpsize 1`` sets. A weight shared by several layers keeps one Quant
(FINN's FoldQuantWeights refuses such a fork: duplicate the weight first).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.ir import SOURCE_KEY, NameAuthority, add_initializer, constant_array, copy_model, to_proto, write_file_atomically
from qcompiler.op_roles import input_roles
from qcompiler.quant.weights import BIPOLAR_BITS, weight_qrange
from qcompiler.targets.spec import INTEGER_BITS, TargetSpec

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPSET = 1
FILENAME = "model.qonnx.onnx"


class FloatFormat(NamedTuple):
    """A FloatQuant's parameters: the minifloat a float8 type is."""

    exponent_bitwidth: int
    mantissa_bitwidth: int
    exponent_bias: int
    max_val: float
    has_inf: bool
    has_nan: bool


#: The float8 types QuantizeLinear/DequantizeLinear may carry (those targets can choose) as
#: FloatQuant parameters; both have subnormals.
FLOAT8_FORMATS: dict[ir.DataType, FloatFormat] = {
    ir.DataType.FLOAT8E4M3FN: FloatFormat(4, 3, 7, 448.0, has_inf=False, has_nan=True),
    ir.DataType.FLOAT8E5M2: FloatFormat(5, 2, 15, 57344.0, has_inf=True, has_nan=True),
}


def quant_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """The integer range [qmin, qmax] of a QONNX Quant (qonnx's ``min_int``/``max_int``)."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def _format_of_range(lo: int, hi: int, signed: bool) -> tuple[int, bool]:
    """(bits, narrow) of the Quant whose range is exactly [lo, hi]; QCError if none is."""
    bits = int(hi).bit_length() + (1 if signed else 0)
    for narrow in (False, True):
        if bits >= 1 and quant_range(bits, signed, narrow) == (lo, hi):
            return bits, narrow
    raise QCError(f"integer range [{lo}, {hi}] is no {'signed' if signed else 'unsigned'} Quant range (full or narrow b-bit)")


def _int_type(value: ir.Value | None) -> tuple[int, bool]:
    dtype = value.dtype if value is not None else None
    if dtype not in INTEGER_BITS:
        raise QCError(f"'{value.name if value is not None else '?'}' has type {dtype}: not an integer type QONNX export knows")
    return INTEGER_BITS[dtype]


def _is_standard(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


class _Exporter:
    def __init__(self, model: ir.Model, target: TargetSpec, weight_bits: Mapping[str, int]) -> None:
        self.model = model
        self.graph = model.graph
        self.target = target
        self.weight_bits = weight_bits
        self.names = NameAuthority(model.graph)

    # -- helpers --------------------------------------------------------------------------------
    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self.names, base, np.asarray(array))

    def _quant(self, x: ir.Value, scale: np.ndarray, zero_point: np.ndarray, bits: int, signed: bool, narrow: bool, base: str) -> ir.Node:
        """A Quant node reading ``x`` with fresh float32 parameter initializers."""
        s = self._initializer(f"{base}_quant_scale", np.asarray(scale, np.float32))
        z = self._initializer(f"{base}_quant_zeropt", np.asarray(zero_point, np.float32))
        b = self._initializer(f"{base}_quant_bitwidth", np.asarray(float(bits), np.float32))
        attrs = [ir.AttrInt64("signed", int(signed)), ir.AttrInt64("narrow", int(narrow)), ir.AttrString("rounding_mode", "ROUND")]
        return ir.Node(QONNX_DOMAIN, "Quant", [x, s, z, b], attrs, name=self.names.fresh(f"{base}_Quant"))

    def _float_quant(self, x: ir.Value, scale: np.ndarray, fmt: FloatFormat, base: str) -> ir.Node:
        """A FloatQuant node reading ``x`` with fresh float32 parameter initializers."""
        params = [
            self._initializer(f"{base}_floatquant_{name}", np.asarray(value, np.float32))
            for name, value in (
                ("scale", scale),
                ("exponent_bitwidth", float(fmt.exponent_bitwidth)),
                ("mantissa_bitwidth", float(fmt.mantissa_bitwidth)),
                ("exponent_bias", float(fmt.exponent_bias)),
                ("max_val", fmt.max_val),
            )
        ]
        attrs = [
            ir.AttrInt64("has_inf", int(fmt.has_inf)),
            ir.AttrInt64("has_nan", int(fmt.has_nan)),
            ir.AttrInt64("has_subnormal", 1),
            ir.AttrInt64("saturation", 1),
            ir.AttrString("rounding_mode", "ROUND"),
        ]
        return ir.Node(QONNX_DOMAIN, "FloatQuant", [x, *params], attrs, name=self.names.fresh(f"{base}_FloatQuant"))

    def _take_over(self, new: ir.Value, old: ir.Value, like: ir.Value) -> None:
        """Give ``new`` the name, type and readers (graph outputs included) of ``old``."""
        name = old.name
        old.name = self.names.fresh(f"{name}_replaced")
        new.name = name
        new.dtype, new.shape = like.dtype or ir.DataType.FLOAT, like.shape
        if SOURCE_KEY in old.metadata_props:
            new.metadata_props[SOURCE_KEY] = old.metadata_props[SOURCE_KEY]
        old.replace_all_uses_with(new, replace_graph_outputs=True)

    # -- activations: QuantizeLinear -> [Clip] -> DequantizeLinear --------------------------------
    def activation(self, q: ir.Node) -> None:
        x, q_out = q.inputs[0], q.outputs[0]
        scale = constant_array(q.inputs[1])
        zp_value = q.inputs[2] if len(q.inputs) > 2 else None
        zp = constant_array(zp_value) if zp_value is not None else np.zeros((), np.uint8)
        if x is None or scale is None or zp is None:
            raise QCError("QuantizeLinear with a computed scale or zero point: QONNX export needs constants", node=q.name)
        if scale.size != 1:
            raise QCError("per-channel activation quantizer: QONNX export handles per-tensor activations", node=q.name)
        out_type = q_out.dtype if q_out.dtype is not None else (zp_value.dtype if zp_value is not None else ir.DataType.UINT8)
        if out_type in FLOAT8_FORMATS:
            self._float_activation(q, x, scale, zp, FLOAT8_FORMATS[out_type])
            return
        width, signed = _int_type(q_out) if q_out.dtype is not None else INTEGER_BITS[out_type]
        lo, hi = quant_range(width, signed, False)
        clips = [n for n in q_out.consumers() if _is_standard(n, "Clip")]
        readers = [n for n in q_out.consumers() if not _is_standard(n, "Clip")]
        if len(clips) > 1 or (clips and readers):
            raise QCError("QuantizeLinear output read both through a Clip and directly: not one quantizer", node=q.name)
        narrowed_by = clips[0] if clips else None
        if narrowed_by is not None:
            bounds = [constant_array(v) if v is not None else None for v in narrowed_by.inputs[1:3]]
            if len(bounds) != 2 or any(b is None for b in bounds):
                raise QCError("Clip after QuantizeLinear without constant bounds", node=narrowed_by.name)
            lo, hi = max(lo, int(bounds[0])), min(hi, int(bounds[1]))
            readers = list(narrowed_by.outputs[0].consumers())
        bits, narrow = _format_of_range(lo, hi, signed)
        dqs = self._dequantizers(q, readers, scale, zp)
        producer = x.producer()
        if signed and producer is not None and _is_standard(producer, "Relu") and not np.any(zp) and bits >= 2:
            # x >= 0: clamp(round(x/s), -(2^(b-1)) [+1], 2^(b-1)-1) == clamp(round(x/s), 0, 2^(b-1)-1).
            bits, signed, narrow = bits - 1, False, False
        base = dqs[0].outputs[0].metadata_props.get(SOURCE_KEY) or x.name
        quant = self._quant(x, scale.reshape(()), zp.astype(np.float32).reshape(()), bits, signed, narrow, base)
        self._replace_chain(q, quant, dqs, narrowed_by, base)

    def _float_activation(self, q: ir.Node, x: ir.Value, scale: np.ndarray, zp: np.ndarray, fmt: FloatFormat) -> None:
        """A float8 QuantizeLinear -> DequantizeLinear chain as one FloatQuant."""
        if "saturate" in q.attributes and q.attributes["saturate"].as_int() == 0:
            raise QCError("float8 QuantizeLinear with saturate = 0 (overflow to NaN/inf): the FloatQuant written is saturating", node=q.name)
        if np.any(zp.astype(np.float32)):
            raise QCError("float8 QuantizeLinear with a non-zero zero point: FloatQuant has none", node=q.name)
        readers = list(q.outputs[0].consumers())
        if clip := next((n for n in readers if _is_standard(n, "Clip")), None):
            raise QCError("Clip on a float8 tensor: FloatQuant has no range narrower than its format's", node=clip.name)
        dqs = self._dequantizers(q, readers, scale, zp)
        base = dqs[0].outputs[0].metadata_props.get(SOURCE_KEY) or x.name
        self._replace_chain(q, self._float_quant(x, scale.astype(np.float32).reshape(()), fmt, base), dqs, None, base)

    def _dequantizers(self, q: ir.Node, readers: list[ir.Node], scale: np.ndarray, zp: np.ndarray) -> list[ir.Node]:
        """``readers`` (of ``q``'s output, or of its Clip's), all DequantizeLinear nodes undoing
        ``q``; QCError otherwise."""
        dqs = [n for n in readers if _is_standard(n, "DequantizeLinear")]
        if stray := [n for n in readers if n not in dqs]:
            raise QCError(
                f"{stray[0].op_type} '{stray[0].name}' runs on the quantized (integer or float8) tensor: QONNX has float tensors only; compile with integer_passthrough = [] in the target",
                node=q.name,
            )
        if not dqs:
            raise QCError("QuantizeLinear is never dequantized", node=q.name)
        for dq in dqs:
            dq_scale = constant_array(dq.inputs[1])
            dq_zp = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros_like(zp)
            if dq_scale is None or dq_zp is None or not (np.array_equal(dq_scale.reshape(-1), scale.reshape(-1)) and np.array_equal(dq_zp.reshape(-1), zp.reshape(-1))):
                raise QCError("DequantizeLinear does not undo its QuantizeLinear (another scale or zero point)", node=dq.name)
        return dqs

    def _replace_chain(self, q: ir.Node, quant: ir.Node, dqs: list[ir.Node], narrowed_by: ir.Node | None, base: str) -> None:
        """Put ``quant`` in place of ``q`` -> [``narrowed_by``] -> ``dqs``."""
        quant.metadata_props[SOURCE_KEY] = base
        self.graph.insert_after(q, quant)
        for i, dq in enumerate(dqs):
            if i == 0:
                self._take_over(quant.outputs[0], dq.outputs[0], like=dq.outputs[0])
            else:
                dq.outputs[0].replace_all_uses_with(quant.outputs[0], replace_graph_outputs=True)
        self.graph.remove(dqs, safe=True)
        if narrowed_by is not None:
            self.graph.remove(narrowed_by, safe=True)
        self.graph.remove(q, safe=True)

    # -- constants: integer initializer -> DequantizeLinear --------------------------------------
    def constant(self, dq: ir.Node) -> None:
        q_value, out = dq.inputs[0], dq.outputs[0]
        if "block_size" in dq.attributes and dq.attributes["block_size"].as_int() > 0:
            raise QCError("block-wise DequantizeLinear (block_size): QONNX Quant has no blocked scales", node=dq.name)
        if q_value.dtype in FLOAT8_FORMATS:
            self._float_constant(dq, FLOAT8_FORMATS[q_value.dtype])
            return
        width, signed = _int_type(q_value)
        q = q_value.const_value.numpy().astype(np.int64)
        scale, zp = _constant_params(dq, q.ndim)
        zp = zp.astype(np.int64)
        # What DequantizeLinear computes: (q - zero point) in float32, times the float32 scale.
        values = (q - zp).astype(np.float32) * scale
        source = dq.metadata_props.get(SOURCE_KEY) or out.metadata_props.get(SOURCE_KEY) or q_value.name
        base = source if source not in self.graph.initializers and not any(v.name == source for v in self.graph.inputs) else f"{source}_float"
        float_value = self._initializer(base, values)
        float_value.metadata_props[SOURCE_KEY] = source
        if width == 32:
            # An int32 bias: FINN takes it float (see the module docstring).
            out.replace_all_uses_with(float_value, replace_graph_outputs=True)
            self.graph.remove(dq, safe=True)
            return
        is_weight = any(
            (roles := input_roles(use.node)).weight is not None and roles.weight == use.idx or (_is_standard(use.node, "MatMul") and use.idx == 1)
            for use in out.uses()
        )
        bits = int(self.weight_bits.get(source, width))
        if bits == BIPOLAR_BITS:
            self._bipolar(dq, float_value, q, scale, zp, signed, source)
            return
        narrow = bool(signed and is_weight and weight_qrange(self.target.weights, bits)[0] == -(2 ** (bits - 1) - 1))
        qmin, qmax = quant_range(bits, signed, narrow)
        if q.size and (q.min() < qmin or q.max() > qmax):
            raise QCError(f"'{source}' holds integers in [{q.min()}, {q.max()}], outside the {bits}-bit Quant range [{qmin}, {qmax}]", node=dq.name)
        quant = self._quant(float_value, scale, zp.astype(np.float32), bits, signed, narrow, source)
        quant.metadata_props[SOURCE_KEY] = source
        self.graph.insert_before(dq, quant)
        self._take_over(quant.outputs[0], out, like=out)
        self.graph.remove(dq, safe=True)

    def _float_constant(self, dq: ir.Node, fmt: FloatFormat) -> None:
        """A float8 weight: its float values (float8 x scale, what the DequantizeLinear computes)
        followed by a FloatQuant with the same scale, which gives them back bit for bit. The
        width assign-precision recorded does not apply: a float8 weight is float8 at any width."""
        q_value, out = dq.inputs[0], dq.outputs[0]
        q = q_value.const_value.numpy().astype(np.float32)
        scale, zp = _constant_params(dq, q.ndim)
        if np.any(zp.astype(np.float32)):
            raise QCError("float8 DequantizeLinear with a non-zero zero point: FloatQuant has none", node=dq.name)
        values = q * scale
        source = dq.metadata_props.get(SOURCE_KEY) or out.metadata_props.get(SOURCE_KEY) or q_value.name
        base = source if source not in self.graph.initializers and not any(v.name == source for v in self.graph.inputs) else f"{source}_float"
        float_value = self._initializer(base, values)
        float_value.metadata_props[SOURCE_KEY] = source
        quant = self._float_quant(float_value, scale, fmt, source)
        quant.metadata_props[SOURCE_KEY] = source
        self.graph.insert_before(dq, quant)
        self._take_over(quant.outputs[0], out, like=out)
        self.graph.remove(dq, safe=True)

    def _bipolar(self, dq: ir.Node, float_value: ir.Value, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, signed: bool, source: str) -> None:
        """A 1-bit weight: ``float_value`` (exactly q x scale) followed by BipolarQuant(x, scale),
        which gives where(x >= 0, 1, -1) x scale, the same values when every scale is > 0."""
        if not signed or np.any(zp) or (q.size and not np.all(np.abs(q) == 1)):
            raise QCError(f"'{source}' is a 1-bit weight but not bipolar (integers -1 and +1, zero point 0, a signed type)", node=dq.name)
        if np.any(scale <= 0):
            raise QCError(f"'{source}' is a 1-bit weight with a scale <= 0: BipolarQuant would not give its values back", node=dq.name)
        s = self._initializer(f"{source}_bipolarquant_scale", np.asarray(scale, np.float32))
        quant = ir.Node(QONNX_DOMAIN, "BipolarQuant", [float_value, s], name=self.names.fresh(f"{source}_BipolarQuant"))
        quant.metadata_props[SOURCE_KEY] = source
        self.graph.insert_before(dq, quant)
        out = dq.outputs[0]
        self._take_over(quant.outputs[0], out, like=out)
        self.graph.remove(dq, safe=True)

    def drop_unused_initializers(self) -> None:
        outputs = {id(v) for v in self.graph.outputs}
        for name, value in list(self.graph.initializers.items()):
            if not value.uses() and id(value) not in outputs and not value.is_graph_input():
                self.graph.initializers.pop(name)


def qonnx_model(model: ir.Model, target: TargetSpec, weight_bits: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """``model`` (a QDQ model compiled for ``target``) with every quantizer written as a QONNX Quant
    node (BipolarQuant for a 1-bit weight, FloatQuant for a float8 type); ``weight_bits`` are the
    widths assign-precision chose, by weight name. ``model`` is not changed."""
    work = copy_model(model)
    exporter = _Exporter(work, target, weight_bits or {})
    for node in list(work.graph):
        if _is_standard(node, "QuantizeLinear"):
            exporter.activation(node)
    for node in list(work.graph):
        if _is_standard(node, "DequantizeLinear") and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            exporter.constant(node)
    if left := [n for n in work.graph if _is_standard(n, "QuantizeLinear") or _is_standard(n, "DequantizeLinear")]:
        raise QCError(f"{left[0].op_type} is not part of a quantizer QONNX export understands (an activation DequantizeLinear without its QuantizeLinear?)", node=left[0].name)
    exporter.drop_unused_initializers()
    work.opset_imports[QONNX_DOMAIN] = QONNX_OPSET
    return to_proto(work)


def write_qonnx_model(model: ir.Model, target: TargetSpec, folder: Path, weight_bits: Mapping[str, int] | None = None) -> Path:
    """Write ``folder/model.qonnx.onnx`` for ``model``; return its path."""
    path = Path(folder) / FILENAME
    write_file_atomically(path, qonnx_model(model, target, weight_bits).SerializeToString())
    return path


def _constant_params(dq: ir.Node, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point of a weight's DequantizeLinear, shaped to broadcast against
    a rank-``rank`` weight along its axis attribute (DequantizeLinear's default: 1)."""
    scale = constant_array(dq.inputs[1])
    zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    zp = constant_array(zp_value) if zp_value is not None else np.zeros((), np.int64)
    if scale is None or zp is None:
        raise QCError("DequantizeLinear of a constant with a computed scale or zero point", node=dq.name)
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    shape = [1] * rank
    if scale.size > 1:
        shape[axis % rank] = -1
    return scale.astype(np.float32).reshape(shape if scale.size > 1 else ()), np.asarray(zp).reshape(shape if np.asarray(zp).size > 1 else ())
