"""A constant tensor stored in a number format, as ONNX onnxruntime computes bit for bit.

`lower_constant` quantizes a float tensor into a format and returns the initializers and nodes
that give back exactly the format's values (times their scales) when onnxruntime runs them:

- natively, as DequantizeLinear of the stored codes, where onnxruntime has the type: integers
  (int4/uint4, int8/uint8, int16/uint16, int32) and float8 (E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ);
  FP4 and FP6 values (E2M1, E2M3, E3M2) are a subset of E4M3FN and are stored in it; fixed point
  is integer codes with a power-of-two scale;
- block formats (MXFP8/6/4, MXINT8, NVFP4) the same way, with DequantizeLinear's ``block_size``
  (opset 21): one float32 scale per block, a power of two for MX (exact), E4M3 x the tensor scale
  for NVFP4 (their float32 product is the scale, as the format's `dequantize` computes it);
- every other float format (fp16, bf16, ``float<e,m>`` with a width, bias or encoding no runtime
  type has) emulated: its values are dyadic, so they are stored as int32 codes in a power-of-two
  unit (``qc.format_unit``) and DequantizeLinear'd with the scale times that unit, exactly. Not a
  Cast of a half-precision initializer nor a float32 constant: onnxruntime folds either into a
  float32 weight, which its QDQ optimizer (all optimizations on) then quantizes to int8 itself
  beside quantized activations (measured on LeNet-5 with uint8 activations: fp16 weights 47 dB
  -> 21 dB). Where int32 cannot hold the codes exactly, the values stay a float32 Mul. The
  layer runs in float32.

Each lowering writes the format's name on the node producing the tensor (``qc.format``), and says
whether it ran natively. onnxruntime accumulates every layer in fp32 or int32, whatever the
storage: unlike Hill et al.'s truncated accumulators, only the stored values are narrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.format_metadata import FORMAT_KEY, FORMAT_UNIT_KEY
from qcompiler.quant.formats import (
    BipolarFormat,
    BlockFormat,
    FixedFormat,
    FloatFormat,
    IntFormat,
    NumberFormat,
    parse_format,
)
from qcompiler.quant.pair_limit import pair_safe_scale
from qcompiler.quant.uniform import channel_ranges, per_channel
from qcompiler.quant.weights import quantize_bipolar

#: Float formats onnxruntime stores natively, by name: (ONNX data type, numpy type).
FLOAT8_STORAGE = {
    "e4m3fn": (ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn), "e4m3fnuz": (ir.DataType.FLOAT8E4M3FNUZ, ml_dtypes.float8_e4m3fnuz),
    "e5m2": (ir.DataType.FLOAT8E5M2, ml_dtypes.float8_e5m2), "e5m2fnuz": (ir.DataType.FLOAT8E5M2FNUZ, ml_dtypes.float8_e5m2fnuz),
}
#: Formats whose every value E4M3FN holds: stored in it.
_IN_E4M3FN = ("e2m1", "e2m3", "e3m2")
_HALF = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}
_INTS = [(ir.DataType.INT4, 4, True), (ir.DataType.UINT4, 4, False), (ir.DataType.INT8, 8, True), (ir.DataType.UINT8, 8, False),
         (ir.DataType.INT16, 16, True), (ir.DataType.UINT16, 16, False), (ir.DataType.INT32, 32, True)]
_NUMPY_INT = {ir.DataType.INT4: ml_dtypes.int4, ir.DataType.UINT4: ml_dtypes.uint4, ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8,
              ir.DataType.INT16: np.int16, ir.DataType.UINT16: np.uint16, ir.DataType.INT32: np.int32}


@dataclass
class LoweredTensor:
    """What `lower_constant` built: add ``initializers`` and ``nodes`` to a graph; ``output`` holds
    the tensor. ``values`` is what onnxruntime computes for it (float32), ``native`` whether a
    runtime type stores it, ``storage`` in which type."""

    output: ir.Value
    nodes: list[ir.Node]
    initializers: list[ir.Value]
    values: np.ndarray
    native: bool
    storage: str


def _int_storage(fmt: IntFormat) -> ir.DataType:
    for dtype, bits, signed in _INTS:
        if signed == fmt.signed and bits >= fmt.bits:
            return dtype
    return ir.DataType.INT32


def _initializer(name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
    return ir.Value(name=name, const_value=tensor, shape=ir.Shape(list(array.shape)), type=ir.TensorType(tensor.dtype))


def _scales(x: np.ndarray, top: float, axis: int | None) -> np.ndarray:
    """float32 scales mapping each channel's max |x| (along ``axis``; the whole tensor when None) to ``top``."""
    lo, hi = channel_ranges(x, axis) if x.size else (np.zeros(()), np.zeros(()))
    amax = np.maximum(-lo, hi)
    return np.where(amax > 0, amax / top, 1.0).astype(np.float32)


def lower_constant(name: str, x: np.ndarray, fmt: NumberFormat | str, axis: int | None = None, block_axis: int = -1, pair_sum_limit: int | None = None) -> LoweredTensor:
    """``x`` stored in ``fmt`` (per channel along ``axis``, per tensor when None; block formats
    along ``block_axis``) as initializers and nodes whose output onnxruntime computes exactly.

    ``pair_sum_limit``: a weight read by integer kernels that add pairs of products in int16
    (onnxruntime's u8s8 on AVX2 without VNNI): a signed integer format wide enough to overflow
    them gets each channel's pair-safe scale (`qcompiler.quant.pair_limit`), so onnxruntime's
    fused kernels compute exactly the stored values."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    x = np.asarray(x, np.float32)
    if isinstance(fmt, BlockFormat):
        return _lower_blocks(name, x, fmt, block_axis)
    if isinstance(fmt, FixedFormat):
        codes = fmt.codes.round(x * np.float32(2.0**fmt.fraction_bits))
        return _dequantize(name, fmt, codes, np.asarray(np.float32(fmt.step)), None, _int_storage(fmt.codes))
    if isinstance(fmt, (IntFormat, BipolarFormat)):
        top = None
        if isinstance(fmt, BipolarFormat):
            scale = quantize_bipolar(x, axis)[1]
        elif pair_sum_limit is not None and fmt.signed and 2 * fmt.max_value > pair_sum_limit:
            lo, hi = channel_ranges(x, axis)
            bound = np.maximum(-lo, hi)
            scale, top = pair_safe_scale(x, axis, bound, int(fmt.max_value), pair_sum_limit)
        else:
            scale = _scales(x, fmt.max_value, axis)
        codes = fmt.round(x / per_channel(scale, x.ndim, axis))
        if top is not None:
            codes = np.clip(codes, -per_channel(top, x.ndim, axis), per_channel(top, x.ndim, axis)).astype(np.float32)
        storage = _int_storage(IntFormat(2, True)) if isinstance(fmt, BipolarFormat) else _int_storage(fmt)
        return _dequantize(name, fmt, codes, scale, axis, storage)
    assert isinstance(fmt, FloatFormat)
    if fmt.name in _HALF:
        stored = x.astype(_HALF[fmt.name]).astype(np.float32)
        coded = _int32_codes(name, fmt, stored, None, axis)
        if coded is not None:
            return coded
        value = _initializer(f"{name}_stored", stored.astype(_HALF[fmt.name]))
        cast = ir.Node("", "Cast", [value], attributes={"to": ir.AttrInt64("to", ir.DataType.FLOAT)}, name=f"{name}_Cast")
        return _finish(name, fmt, cast, [value], stored, True, fmt.name)
    scale = _scales(x, fmt.max_value, axis)
    values = fmt.round(x / per_channel(scale, x.ndim, axis), saturate=True)
    storage = fmt.name if fmt.name in FLOAT8_STORAGE else ("e4m3fn" if fmt.name in _IN_E4M3FN else None)
    if storage is None:
        coded = _int32_codes(name, fmt, values.astype(np.float32), scale, axis)
        if coded is not None:
            return coded
        # int32 cannot hold them exactly: the format's values in float32, times the scale (a Mul,
        # the same float32 product DequantizeLinear computes; the values stay checkable).
        value = _initializer(f"{name}_values", values.astype(np.float32))
        s = _initializer(f"{name}_scale", per_channel(scale, x.ndim, axis).astype(np.float32))
        mul = ir.Node("", "Mul", [value, s], name=f"{name}_Mul")
        emulated = (values.astype(np.float32) * per_channel(scale, x.ndim, axis)).astype(np.float32)
        return _finish(name, fmt, mul, [value, s], emulated, False, "float32")
    dtype, numpy_type = FLOAT8_STORAGE[storage]
    return _dequantize(name, fmt, values, scale, axis, dtype, numpy_type)


def _int32_codes(name: str, fmt: FloatFormat, values: np.ndarray, scale: np.ndarray | None, axis: int | None) -> LoweredTensor | None:
    """``values`` (the format's own values) times ``scale`` (None: one) as int32 codes that a
    DequantizeLinear multiplies by a power-of-two unit (per tensor, or per channel along ``axis``)
    times the scale, when that computes exactly ``values * scale`` in float32; None otherwise.
    The unit is the format's finest step (its smallest subnormal), coarser where the largest code
    would not fit int32; a float format's values have few significant bits, so int32 -> float32
    converts every code exactly."""
    if not np.all(np.isfinite(values)):
        return None
    finest = 2.0 ** (1 - fmt.effective_bias - fmt.mantissa_bits)
    top = np.abs(values).max() if axis is None or values.ndim == 0 else channel_ranges(np.abs(values), axis)[1]
    units = np.maximum(finest, 2.0 ** (np.ceil(np.log2(np.maximum(np.asarray(top, np.float64), 1e-300))) - 30))
    if units.size > 1 and units.min() == units.max():
        units = units.reshape(-1)[:1].reshape(())  # one unit for all: per tensor
    unit_axis = axis if units.ndim else None
    codes = values.astype(np.float64) / per_channel(units, values.ndim, unit_axis)
    if not np.all(codes == np.round(codes)) or np.abs(codes).max(initial=0) >= 2.0**31:
        return None
    if scale is None:
        step, step_axis, expected = units.astype(np.float32), unit_axis, values.astype(np.float32)
    else:
        # unit x scale is exact (a power of two times a float32), and so is code x (unit x scale).
        step_axis = axis if np.ndim(scale) else unit_axis
        step = (np.asarray(scale, np.float64) * units).astype(np.float32)
        expected = (values.astype(np.float32) * per_channel(np.asarray(scale, np.float32), values.ndim, axis if np.ndim(scale) else None)).astype(np.float32)
    lowered = _dequantize(name, fmt, codes.astype(np.int32), step, step_axis, ir.DataType.INT32)
    if not np.array_equal(lowered.values, expected):  # -0.0 becomes code 0: equal, not the same bits
        return None  # the scale times the unit left float32's range: not exact
    # A DequantizeLinear whose output reaches a Conv directly is fused by onnxruntime (all
    # optimizations, the Conv's output quantized) into a QLinearConv, which has no int32 weights:
    # the session would not load. Max with -inf changes no value and stops the fusion (a Mul by
    # one or an Add of zero is removed first).
    dq = lowered.nodes[0]
    dq.metadata_props[FORMAT_UNIT_KEY] = " ".join(float(u).hex() for u in np.atleast_1d(units))
    floor = _initializer(f"{name}_no_fusion", np.array(-np.inf, np.float32))
    barrier = ir.Node("", "Max", [lowered.output, floor], name=f"{name}_Max")
    result = _finish(name, fmt, barrier, [*lowered.initializers, floor], lowered.values, False, "int32")
    dq.outputs[0].name = f"{result.output.name}_dequantized"
    result.nodes = [dq, barrier]
    return result


def _dequantize(name: str, fmt: NumberFormat, codes: np.ndarray, scale: np.ndarray, axis: int | None, dtype: ir.DataType,
                numpy_type: type | None = None, block_size: int = 0) -> LoweredTensor:
    stored = codes.astype(numpy_type or _NUMPY_INT[dtype])
    q = _initializer(f"{name}_quantized", stored, dtype)
    s = _initializer(f"{name}_scale", np.asarray(scale, np.float32))
    attrs = {}
    if axis is not None and np.ndim(scale) > 0:
        attrs["axis"] = ir.AttrInt64("axis", axis)
    if block_size:
        attrs["block_size"] = ir.AttrInt64("block_size", block_size)
    dq = ir.Node("", "DequantizeLinear", [q, s], attributes=attrs, name=f"{name}_DequantizeLinear")
    if block_size:
        repeated = np.take(np.repeat(np.asarray(scale, np.float32), block_size, axis=axis), np.arange(codes.shape[axis]), axis=axis)
        values = (stored.astype(np.float32) * repeated).astype(np.float32)
    else:
        values = (stored.astype(np.float32) * per_channel(np.asarray(scale, np.float32), codes.ndim, axis)).astype(np.float32)
    return _finish(name, fmt, dq, [q, s], values, True, ir.DataType(dtype).name.lower())


def _lower_blocks(name: str, x: np.ndarray, fmt: BlockFormat, block_axis: int) -> LoweredTensor:
    if x.ndim == 0:
        x = x.reshape(1)
    axis = block_axis % x.ndim
    elements, block_scales, tensor_scale = fmt.quantize(x, axis)
    # One float32 scale per block, as DequantizeLinear multiplies: exact for MX's powers of two.
    scale = (block_scales.astype(np.float32) * np.float32(tensor_scale)).astype(np.float32)
    element = fmt.element
    if isinstance(element, FixedFormat):
        codes = element.codes.round(elements * np.float32(2.0**element.fraction_bits))
        return _dequantize(name, fmt, codes, (scale * np.float32(element.step)).astype(np.float32), axis, _int_storage(element.codes), block_size=fmt.block_size)
    storage = element.name if element.name in FLOAT8_STORAGE else "e4m3fn"
    dtype, numpy_type = FLOAT8_STORAGE[storage]
    return _dequantize(name, fmt, elements, scale, axis, dtype, numpy_type, block_size=fmt.block_size)


def _finish(name: str, fmt: NumberFormat, node: ir.Node, initializers: list[ir.Value], values: np.ndarray, native: bool, storage: str) -> LoweredTensor:
    node.metadata_props[FORMAT_KEY] = fmt.name
    out = node.outputs[0]
    out.name = f"{name}_{fmt.name.replace('<', '_').replace('>', '').replace(',', '_').replace('=', '')}"
    out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(list(values.shape))
    return LoweredTensor(out, [node], initializers, values, native, storage)
