"""The encodings file Qualcomm's tools read (AIMET's layout), written beside a compiled QDQ model.

``qnn-onnx-converter --quantization_overrides encodings.json`` and AIMET take, per tensor, the
bit-width, scale, offset, min, max, dtype and whether it is symmetric. Offsets follow AIMET's
convention: the integer range is read as unsigned [0, 2^b - 1] and ``min = offset x scale``, so a
symmetric int8 weight has offset -128 and a uint8 activation with zero point z has offset -z.
Activations are keyed by the float tensor the QuantizeLinear reads; weights and biases by the
initializer they were quantized from (the ``qc.source`` of their DequantizeLinear).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.ir import SOURCE_KEY, constant_array, write_file_atomically
from qcompiler.op_roles import input_roles
from qcompiler.targets.spec import INTEGER_BITS, TargetSpec



def _entries(scale: np.ndarray, zero_point: np.ndarray, dtype: ir.DataType, symmetric: bool, bits: int | None = None) -> list[dict[str, Any]]:
    width, signed = INTEGER_BITS[dtype]
    bits = bits or width
    scale = np.asarray(scale, np.float64).reshape(-1)
    zp = np.broadcast_to(np.asarray(zero_point, np.int64).reshape(-1), scale.shape)
    # Unsigned view of the b-bit range: a signed zero point z sits at z + 2^(b-1).
    zp_unsigned = zp + (2 ** (bits - 1) if signed else 0)
    offset = -zp_unsigned
    return [
        {
            "bitwidth": int(bits),
            "dtype": "int",
            "is_symmetric": "True" if symmetric else "False",
            "offset": int(o),
            "scale": float(s),
            "min": float(o * s),
            "max": float((o + 2**bits - 1) * s),
        }
        for s, o in zip(scale, offset)
    ]


def _narrow_bits(q: ir.Node) -> int | None:
    """The width a Clip after a QuantizeLinear narrows its output to (assign-precision's lowering)."""
    for clip in q.outputs[0].consumers():
        if clip.op_type == "Clip" and len(clip.inputs) == 3:
            lo, hi = constant_array(clip.inputs[1]), constant_array(clip.inputs[2])
            if lo is not None and hi is not None:
                return int(np.ceil(np.log2(int(hi) - int(lo) + 1)))
    return None


def encodings(model: ir.Model, target: TargetSpec, weight_bits: Mapping[str, int] | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """AIMET-style ``activation_encodings`` and ``param_encodings`` of a QDQ model compiled for
    ``target``; ``weight_bits`` are the widths assign-precision chose (by weight name)."""
    weight_bits = weight_bits or {}
    activations: dict[str, list[dict[str, Any]]] = {}
    params: dict[str, list[dict[str, Any]]] = {}
    for node in model.graph:
        if node.op_type == "QuantizeLinear" and node.inputs[0] is not None:
            scale = constant_array(node.inputs[1])
            zp_value = node.inputs[2] if len(node.inputs) > 2 else None
            if scale is None or (zp_value is not None and constant_array(zp_value) is None):
                continue
            dtype = zp_value.const_value.dtype if zp_value is not None else ir.DataType.UINT8
            zp = constant_array(zp_value) if zp_value is not None else np.zeros(1, np.int64)
            # An activation's bit-width is its type's, or the narrower one a Clip enforces.
            activations[node.inputs[0].name] = _entries(scale, zp, dtype, target.activations.symmetric, bits=_narrow_bits(node))
        elif node.op_type == "DequantizeLinear" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            role = _param_role(node)
            scale = constant_array(node.inputs[1])
            zp = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(1, np.int64)
            dtype = node.inputs[0].const_value.dtype
            if scale is None or zp is None or dtype not in INTEGER_BITS:
                continue
            name = node.metadata_props.get(SOURCE_KEY) or node.inputs[0].name
            if role == "weight":
                params[name] = _entries(scale, zp, dtype, target.weights.symmetric, bits=weight_bits.get(name))
            elif role == "bias":
                params[name] = _entries(scale, zp, dtype, True)
            else:  # a constant operand of Add/Mul/Concat: quantized like an activation
                activations[name] = _entries(scale, zp, dtype, target.activations.symmetric)
    return {"activation_encodings": activations, "param_encodings": params}


def _param_role(dq: ir.Node) -> str | None:
    for reader in dq.outputs[0].consumers():
        roles = input_roles(reader)
        if reader.op_type == "MatMul" and reader.inputs[1] is dq.outputs[0]:
            return "weight"
        if roles.weight is not None and reader.inputs[roles.weight] is dq.outputs[0]:
            return "weight"
        if roles.bias is not None and len(reader.inputs) > roles.bias and reader.inputs[roles.bias] is dq.outputs[0]:
            return "bias"
    return None


def write_qnn_encodings(model: ir.Model, target: TargetSpec, folder: Path, weight_bits: Mapping[str, int] | None = None) -> Path:
    """Write ``folder/encodings.json`` for ``model``; return its path."""
    path = folder / "encodings.json"
    write_file_atomically(path, (json.dumps({"version": "0.6.1", **encodings(model, target, weight_bits)}, indent=2) + "\n").encode())
    return path
