"""The number format of every quantized tensor, written into the graph and checked against it.

Each DequantizeLinear a pass writes carries ``qc.format`` in its metadata (``"int2"``,
``"uint4"``, ``"e4m3fn"``, ``"bipolar"``...): the values its input may hold, narrower than the
storage type where a width below it was chosen (a 2-bit weight stored in int8, a 4-bit activation
clipped inside uint8). `qc validate` parses it and checks that the stored values are in it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.ir import SOURCE_KEY, constant_array
from qcompiler.quant.formats import (
    BIPOLAR,
    BlockFormat,
    FixedFormat,
    FloatFormat,
    IntFormat,
    NumberFormat,
    parse_format,
)
from qcompiler.quant.uniform import channel_ranges, per_channel

#: The metadata key (on the DequantizeLinear node) holding the format's name.
FORMAT_KEY = "qc.format"

#: Metadata beside it when a float format is stored as int32 codes (`format_lowering`): the
#: power of two (float.hex) the codes count in, or one per channel (space-separated, along the
#: DequantizeLinear's axis); the format's values are codes x unit.
FORMAT_UNIT_KEY = "qc.format_unit"

#: The format each ONNX storage type holds at full width.
_STORAGE = {
    ir.DataType.INT4: "int4", ir.DataType.UINT4: "uint4", ir.DataType.INT8: "int8", ir.DataType.UINT8: "uint8",
    ir.DataType.INT16: "int16", ir.DataType.UINT16: "uint16", ir.DataType.INT32: "int32",
    ir.DataType.FLOAT8E4M3FN: "e4m3fn", ir.DataType.FLOAT8E4M3FNUZ: "e4m3fnuz", ir.DataType.FLOAT8E5M2: "e5m2",
    ir.DataType.FLOAT8E5M2FNUZ: "e5m2fnuz", ir.DataType.FLOAT4E2M1: "e2m1",
}


def _storage_format(value: ir.Value | None) -> NumberFormat | None:
    dtype = value.dtype if value is not None else None
    if dtype is None and value is not None and value.const_value is not None:
        dtype = value.const_value.dtype
    name = _STORAGE.get(dtype) if dtype is not None else None
    return parse_format(name) if name is not None else None


def _clip_bounds(value: ir.Value) -> tuple[float, float] | None:
    """The constant bounds of a Clip producing ``value``, if one does."""
    producer = value.producer()
    if producer is None or producer.op_type != "Clip" or len(producer.inputs) < 3:
        return None
    lo, hi = (constant_array(v) if v is not None else None for v in producer.inputs[1:3])
    if lo is None or hi is None:
        return None
    return float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0])


def _narrowest_int(lo: float, hi: float, signed: bool) -> IntFormat:
    """The narrowest integer format holding [lo, hi]."""
    for bits in range(1, 33):
        fmt = IntFormat(bits, signed)
        if fmt.min_value <= lo and hi <= fmt.max_value:
            return fmt
    return IntFormat(32, signed)


def stored_format(dq: ir.Node, widths: Mapping[str, int] | None = None) -> NumberFormat | None:
    """The format of the values DequantizeLinear ``dq`` reads: the storage type's, narrowed to
    the width ``widths`` gives its weight (by source name; 1 is bipolar), or to the range of the
    Clip that feeds it. None for a storage type without a format here."""
    codes = dq.inputs[0] if dq.inputs else None
    storage = _storage_format(codes)
    if storage is None or not isinstance(storage, IntFormat):
        return storage
    source = dq.metadata_props.get(SOURCE_KEY)
    bits = (widths or {}).get(source) if source is not None else None
    if bits == 1:
        return BIPOLAR
    if bits is not None and bits < storage.bits:
        return IntFormat(bits, storage.signed)
    bounds = _clip_bounds(codes) if codes is not None else None
    if bounds is not None:
        narrow = _narrowest_int(*bounds, storage.signed)
        if narrow.bits < storage.bits:
            return narrow
    return storage


def annotate_formats(model: ir.Model, widths: Mapping[str, int] | None = None) -> int:
    """Write ``qc.format`` on every DequantizeLinear of ``model`` that has none; the count written."""
    written = 0
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and FORMAT_KEY not in node.metadata_props:
            fmt = stored_format(node, widths)
            if fmt is not None:
                node.metadata_props[FORMAT_KEY] = fmt.name
                written += 1
    return written


def _checked_format(fmt: NumberFormat) -> NumberFormat:
    """The format the stored values themselves are in: a block format's elements, and for fixed
    point (alone or as MXINT8's elements) the integer codes, value x 2**f."""
    if isinstance(fmt, BlockFormat):
        fmt = fmt.element
    return fmt.codes if isinstance(fmt, FixedFormat) else fmt


def format_violations(node: ir.Node) -> list[str]:
    """What is wrong with ``qc.format`` on ``node`` (a DequantizeLinear, or the Mul of an emulated
    format): a name that is no format, a format its storage type cannot hold, stored values
    outside it, a Clip wider than it."""
    name = node.metadata_props.get(FORMAT_KEY)
    if name is None:
        return []
    try:
        fmt = _checked_format(parse_format(name))
    except QCError as exc:
        return [f"{FORMAT_KEY} '{name}' is not a number format ({exc.message.split(':')[0]})"]
    codes = node.inputs[0] if node.inputs else None
    problems = []
    storage = _storage_format(codes) if node.op_type == "DequantizeLinear" else None
    unit_text = node.metadata_props.get(FORMAT_UNIT_KEY)
    if unit_text is not None:
        return _unit_coded_violations(node, fmt, name, storage, unit_text)
    if storage is not None and not isinstance(fmt, type(storage)) and fmt is not BIPOLAR:
        return [f"{FORMAT_KEY} '{name}' is not stored in {storage.name}"]
    if storage is not None and (fmt.min_value < storage.min_value or fmt.max_value > storage.max_value):
        problems.append(f"{FORMAT_KEY} '{name}' holds values its storage type {storage.name} cannot")
    values = constant_array(codes) if codes is not None else None
    if values is not None and isinstance(fmt, IntFormat) and fmt.signed:
        values = _unmirrored(node, np.asarray(values), fmt)
    if values is not None:
        problems += _outside(np.asarray(values).astype(np.float32) if isinstance(fmt, FloatFormat) else np.asarray(values), fmt, name)
    elif codes is not None and (bounds := _clip_bounds(codes)) is not None and (bounds[0] < fmt.min_value or bounds[1] > fmt.max_value):
        problems.append(f"the Clip feeding it allows [{bounds[0]:g}, {bounds[1]:g}], wider than {FORMAT_KEY} '{name}'")
    return problems


def _unmirrored(dq: ir.Node, values: np.ndarray, fmt: IntFormat) -> np.ndarray:
    """``values`` with each output channel that only its negation fits in ``fmt`` negated back.
    A full low-bit range is not its own mirror (int2: -2 to 1), and fold-batchnorm folds a
    negative BatchNormalization scale into a channel's codes, not its (positive) scale: that
    channel holds -1 to 2, the same int2 quantizer times -1. Per channel, zero point 0 only."""
    scale = constant_array(dq.inputs[1]) if len(dq.inputs) > 1 and dq.inputs[1] is not None else None
    zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if scale is None or np.size(scale) < 2 or values.ndim == 0 or (zero is not None and np.any(np.asarray(zero) != 0)):
        return values
    axis = (dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1) % values.ndim
    if values.shape[axis] != np.size(scale):
        return values
    bottom, top = channel_ranges(values, axis)
    flip = (top > fmt.max_value) & (top <= -fmt.min_value) & (bottom >= -fmt.max_value)
    return values * per_channel(np.where(flip, -1, 1).astype(values.dtype), values.ndim, axis) if flip.any() else values


def _outside(values: np.ndarray, fmt: NumberFormat, name: str) -> list[str]:
    """One problem naming how many of ``values`` ``fmt`` cannot hold, and the first of them."""
    outside = ~fmt.representable(values)
    if not outside.any():
        return []
    first = values.reshape(-1)[np.flatnonzero(outside.reshape(-1))[0]]
    return [f"{int(outside.sum())} stored value(s) are not in {FORMAT_KEY} '{name}' (the first: {first})"]


def _unit_coded_violations(node: ir.Node, fmt: NumberFormat, name: str, storage: NumberFormat | None, unit_text: str) -> list[str]:
    """`format_violations` for a float format stored as int32 codes in ``qc.format_unit`` units."""
    try:
        unit = np.array([float.fromhex(u) for u in unit_text.split()], np.float64)
    except ValueError:
        return [f"{FORMAT_UNIT_KEY} '{unit_text[:40]}' is not a list of numbers"]
    if not isinstance(fmt, FloatFormat) or storage is None or storage.name != "int32":
        return [f"{FORMAT_UNIT_KEY} is for float formats stored as int32 codes, not {name} in {storage.name if storage else 'this storage'}"]
    stored = constant_array(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if stored is None:
        return []
    stored = np.asarray(stored, np.float64)
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    if unit.size == 1:
        unit = unit.reshape(())
    elif stored.ndim == 0 or stored.shape[axis % stored.ndim] != unit.size:
        return [f"{FORMAT_UNIT_KEY} has {unit.size} units for a tensor of shape {list(stored.shape)}"]
    return _outside(stored * per_channel(unit, stored.ndim, axis % stored.ndim), fmt, name)
