"""Bias correction: undo the mean shift that weight quantization adds to each output channel.

Quantizing W to W_q changes a layer's output by op(x, W_q - W). Its mean over the data is a
per-channel offset that every later layer sees as a systematic error; at 4 bits and below it
costs several points of accuracy on CIFAR ResNets. Conv, ConvTranspose and Gemm are linear in
both operands, so E[op(x, e)] = op(E[x], e): with the per-position mean of each layer's input
over the calibration data (`LayerInputMeans`), the shift is one small op evaluation, computed
exactly (padding and strides included) by onnxruntime running the node itself. Subtracting it
from the bias (Banner et al. 2019; Nagel et al. 2019) leaves the quantized layer unbiased on
that data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.analysis import Analysis
from qcompiler.errors import QCError
from qcompiler.ir import constant_array, is_float_tensor, opset_version, to_proto
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import PassContext
from qcompiler.runtime import make_session, with_extra_outputs

#: Ops whose bias input can absorb the shift (MatMul has none; its bias is a separate Add).
CORRECTABLE = ("Conv", "ConvTranspose", "Gemm")
#: Axis of the output channels in each op's output.
_CHANNEL_AXIS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1}


def correctable_inputs(model: ir.Model) -> dict[str, ir.Value]:
    """Input activation of every correctable node with a constant float weight, by node name."""
    found = {}
    for node in model.graph:
        if node.op_type not in CORRECTABLE or node.domain not in ("", "ai.onnx"):
            continue
        roles = input_roles(node)
        x, w = node.inputs[roles.activations[0]], node.inputs[roles.weight]
        if x is not None and w is not None and is_float_tensor(x) and constant_array(w) is not None:
            found[node.name] = x
    return found


@dataclass(frozen=True)
class LayerInputMeans(Analysis[dict[str, np.ndarray]]):
    """Per-position mean over the samples of each correctable layer's input (by value name).

    Shaped like one sample with a leading 1 (e.g. [1, C, H, W]); streamed batch by batch
    through onnxruntime, so memory is one sample's worth per layer.
    """

    name = "layer-input-means"
    batch_size: int = 32

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[str, np.ndarray]:
        if ctx.data is None:
            raise QCError("bias correction needs data: pass --calib FILE.npz", pass_name="insert-qdq", option="bias-correction")
        names = sorted({v.name for v in correctable_inputs(model).values()})
        if not names:
            return {}
        graph_inputs = {v.name for v in model.graph.inputs}
        session = make_session(with_extra_outputs(to_proto(model), [n for n in names if n not in graph_inputs]), optimize=False, what="model for bias correction")
        sums: dict[str, np.ndarray] = {}
        count = 0
        for batch in ctx.data.batches(self.batch_size):
            fetched = [n for n in names if n not in graph_inputs]
            arrays = dict(zip(fetched, session.run(fetched, batch)))
            arrays.update({n: batch[n] for n in names if n in graph_inputs})
            for name, array in arrays.items():
                total = np.asarray(array, dtype=np.float64).sum(axis=0, keepdims=True)
                sums[name] = sums[name] + total if name in sums else total
            count += len(next(iter(batch.values())))
        return {name: (s / max(count, 1)).astype(np.float32) for name, s in sums.items()}


def output_shift(node: ir.Node, x_mean: np.ndarray, weight_error: np.ndarray, opset: int) -> np.ndarray:
    """Mean over the data of op(x, weight_error) per output channel: the bias shift W_q - W causes.

    Runs ``node``'s own op type and attributes in onnxruntime on the mean input, so every
    attribute (pads, strides, dilations, groups, transA/transB, alpha) is honoured exactly.
    """
    roles = input_roles(node)
    inputs = [None] * (roles.weight + 1)
    inputs[roles.activations[0]] = "x"
    inputs[roles.weight] = "w"
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    if node.op_type == "Gemm":
        attributes.pop("beta", None)  # no C input here
    proto_node = onnx.helper.make_node(node.op_type, inputs, ["y"], **attributes)
    graph = onnx.helper.make_graph(
        [proto_node],
        "bias_shift",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x_mean.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight_error.astype(np.float32), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    (y,) = make_session(model, optimize=False, what=f"bias-shift model of node '{node.name}'").run(["y"], {"x": x_mean.astype(np.float32)})
    axis = _CHANNEL_AXIS[node.op_type]
    return np.asarray(y, dtype=np.float64).mean(axis=tuple(i for i in range(y.ndim) if i != axis))


def corrected_bias(node: ir.Node, model: ir.Model, x_mean: np.ndarray, weight: np.ndarray, dequantized: np.ndarray) -> np.ndarray | None:
    """The per-channel bias that makes ``node`` with weight ``dequantized`` match its float mean
    output on the data, or None where the node's bias cannot hold a per-channel correction (a Gemm
    with transA, beta = 0, or a C that is not one value per output channel)."""
    roles = input_roles(node)
    bias_value = node.inputs[roles.bias] if roles.bias is not None else None
    beta = 1.0
    if node.op_type == "Gemm":
        if "transA" in node.attributes and node.attributes["transA"].as_int():
            return None  # the sample axis is not axis 0 of the input
        beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        if bias_value is not None and beta == 0.0:
            return None
    shift = output_shift(node, x_mean, dequantized.astype(np.float64) - weight.astype(np.float64), opset_version(model))
    if bias_value is None:
        return (-shift).astype(np.float32)
    bias = constant_array(bias_value)
    if bias is None or bias.size not in (1, shift.size) or (bias.ndim > 1 and bias.shape[-1] != shift.size):
        return None
    return (np.broadcast_to(bias.astype(np.float64).reshape(-1), shift.shape) - shift / beta).astype(np.float32)
