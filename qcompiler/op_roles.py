"""What each input of an ONNX op means to a quantizer: activation, weight (with its channel axis) or bias.

This is ONNX operator semantics, not a target's choice: targets decide *whether* an op runs
quantized; this module says *which* inputs are weights and along which axis their output channels lie.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir


@dataclass(frozen=True)
class InputRoles:
    """Indices of an op's inputs by role. ``weight_axis`` is the output-channel axis of the weight."""

    activations: tuple[int, ...]
    weight: int | None = None
    weight_axis: int | None = None
    bias: int | None = None


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def input_roles(node: ir.Node) -> InputRoles:
    """The roles of ``node``'s inputs. Ops without weights list all float data inputs as activations."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return InputRoles(activations=tuple(range(len(node.inputs))))
    if op == "Conv":
        return InputRoles(activations=(0,), weight=1, weight_axis=0, bias=2 if len(node.inputs) > 2 else None)
    if op == "ConvTranspose":
        # Weight is [C_in, C_out/group, ...]: output channels on axis 1 (per-channel only when group == 1).
        return InputRoles(activations=(0,), weight=1, weight_axis=1, bias=2 if len(node.inputs) > 2 else None)
    if op == "Gemm":
        trans_b = _attr_int(node, "transB", 0)
        return InputRoles(activations=(0,), weight=1, weight_axis=0 if trans_b else 1, bias=2 if len(node.inputs) > 2 else None)
    if op == "MatMul":
        b = node.inputs[1]
        if b is not None and b.const_value is not None:
            return InputRoles(activations=(0,), weight=1, weight_axis=len(b.const_value.shape) - 1)
        return InputRoles(activations=(0, 1))
    if op in ("Reshape", "Slice", "Pad", "Squeeze", "Unsqueeze", "Expand", "Tile", "Gather", "Resize", "Upsample"):
        # Later inputs are shapes, indices, pads or scales: only the data input carries activations.
        return InputRoles(activations=(0,))
    return InputRoles(activations=tuple(range(len(node.inputs))))
