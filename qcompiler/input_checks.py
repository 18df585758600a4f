"""What a float model must be before `compile` quantizes it, checked once at import.

Two kinds of model load and run but cannot be compiled honestly, and both used to yield a model
(or an error about something else) instead of a line naming the cause:

- a model that is already quantized (Q/DQ pairs, QLinearConv, ConvInteger, onnxruntime's
  contrib ops): quantizing its float parts again would stack two quantizers on some tensors and
  leave the rest as the other tool wrote them, and `qc validate` then flags what qc kept;
- a layer weight holding NaN or Inf: every range, scale and SQNR computed from it is NaN, and
  the error surfaced later as an overflow in some downstream tensor.

Both are refused with the node or initializer named. Constants that are not layer weights (an
attention mask's -inf, say) are legitimate and left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.ir import constant_array
from qcompiler.op_roles import input_roles

#: Standard ops that only a quantized model holds.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})
#: onnxruntime contrib ops (com.microsoft) of quantized models.
QUANTIZED_CONTRIB_OPS = frozenset({"MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QGemm", "QEmbedLayerNormalization", "GatherBlockQuantized", "MatMulBnb4", "QOrderedMatMul"})
#: Ops whose weight input holds the model's learned parameters.
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "LSTM", "GRU", "RNN", "BatchNormalization", "LayerNormalization"})


def _is_quantized_op(node: ir.Node) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in QUANTIZED_OPS
    if node.domain == "com.microsoft":
        return node.op_type in QUANTIZED_CONTRIB_OPS or node.op_type.startswith("QLinear")
    return False


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or of a Constant node's ``value``, else None."""
    if value is None:
        return None
    array = constant_array(value)
    producer = value.producer()
    if array is None and producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        array = producer.attributes["value"].as_tensor().numpy()
    return array


def check_float_model(model: ir.Model, file: str) -> None:
    """Raise `QCError` if ``model`` is already quantized or a layer weight is not finite."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if _is_quantized_op(node):
            raise QCError(
                f"the model is already quantized ({node.op_type} '{node.name}'): qc compiles float models; give it the float original (qc validate checks a quantized model against a target)",
                file=file,
            )
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        roles = input_roles(node)
        # Gemm's C, Conv's B: a NaN bias makes every output of its channel NaN as surely.
        indices = range(1, len(node.inputs)) if node.op_type not in ("Gemm", "MatMul", "Gather") else [roles.weight, roles.bias, 0]
        for i in indices:
            value = node.inputs[i] if i is not None and i < len(node.inputs) else None
            array = _constant(value)
            if array is None or not np.issubdtype(array.dtype, np.floating):
                continue
            bad = ~np.isfinite(array)
            if bad.any():
                nans = int(np.isnan(array).sum())
                raise QCError(f"weight '{value.name}' holds {nans} NaN and {int(bad.sum()) - nans} infinite value(s) of {array.size}: the float model's weights must be finite", file=file, node=node.name)
