"""Bias correction: undo the mean shift that weight quantization adds to each output channel.

Quantizing W to W_q changes a layer's output by op(x, W_q - W). Its mean over the data is a
per-channel offset that every later layer sees as a systematic error; at 4 bits and below it
costs several points of accuracy on CIFAR ResNets. Conv, ConvTranspose and Gemm are linear in
both operands, so E[op(x, e)] = op(E[x], e): with the per-position mean of each layer's input
over the calibration data (`LayerInputMeans`), the shift is one small op evaluation, computed
exactly (padding and strides included) by onnxruntime running the node itself. Subtracting it
from the bias (Banner et al. 2019; Nagel et al. 2019) leaves the quantized layer unbiased on
that data.

On data it has not seen, a correction c for a true shift mu changes the squared error by
c^2 - 2 c mu: an estimate dominated by its sampling noise makes the layer worse. That happens on
layers with few inputs per output (depthwise Convs: 9 products per output, so a few calibration
images give a noisy shift) and on small calibration sets. So the means are kept per group of
samples, the shift's standard error comes from the spread of the group shifts, and each channel's
correction is shrunk by its noise, c = m (1 - se^2 / m^2), and only where |m| > 2 se: a shift
well above its noise is corrected in full, one within it not at all.
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


#: Groups of samples whose means are kept apart to estimate the shift's sampling noise.
GROUPS = 8
#: Standard errors a channel's shift must exceed to be corrected at all.
SIGNIFICANCE = 2.0


@dataclass(frozen=True)
class InputMeans:
    """Per-position means of one layer input over groups of samples (sample i in group i mod G)."""

    #: [G, ...one sample's shape], float32
    groups: np.ndarray
    #: [G] samples in each group
    counts: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """The mean over all samples, shaped like one sample with a leading 1."""
        weights = (self.counts / self.counts.sum()).reshape(-1, *([1] * (self.groups.ndim - 1)))
        return (self.groups.astype(np.float64) * weights).sum(axis=0, keepdims=True).astype(np.float32)


@dataclass(frozen=True)
class LayerInputMeans(Analysis[dict[str, InputMeans]]):
    """Per-position means of each correctable layer's input (by value name), over ``GROUPS``
    groups of samples.

    Streamed batch by batch through onnxruntime, so memory is ``GROUPS`` samples' worth per layer.
    """

    name = "layer-input-means"
    batch_size: int = 32

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[str, InputMeans]:
        if ctx.data is None:
            raise QCError("bias correction needs data: pass --calib FILE.npz", pass_name="insert-qdq", option="bias-correction")
        names = sorted({v.name for v in correctable_inputs(model).values()})
        if not names:
            return {}
        graph_inputs = {v.name for v in model.graph.inputs}
        session = make_session(with_extra_outputs(to_proto(model), [n for n in names if n not in graph_inputs]), optimize=False, what="model for bias correction")
        sums: dict[str, np.ndarray] = {}
        counts = np.zeros(GROUPS, dtype=np.int64)
        skipped: set[str] = set()
        seen = 0
        for batch in ctx.data.batches(self.batch_size):
            fetched = [n for n in names if n not in graph_inputs]
            arrays = dict(zip(fetched, session.run(fetched, batch)))
            arrays.update({n: batch[n] for n in names if n in graph_inputs})
            n = len(next(iter(batch.values())))
            group = (seen + np.arange(n)) % GROUPS
            for name, array in arrays.items():
                array = np.asarray(array, dtype=np.float64)
                if array.ndim == 0 or array.shape[0] != n:
                    # The first axis is not the samples (a transposed input, a Gemm with transA):
                    # no per-sample mean exists, and the layer goes uncorrected.
                    skipped.add(name)
                    continue
                total = np.zeros((GROUPS, *array.shape[1:]))
                np.add.at(total, group, array)
                sums[name] = sums[name] + total if name in sums else total
            counts += np.bincount(group, minlength=GROUPS)
            seen += n
        used = counts > 0
        return {name: InputMeans((s[used] / counts[used].reshape(-1, *([1] * (s.ndim - 1)))).astype(np.float32), counts[used]) for name, s in sums.items() if name not in skipped}


def output_shift(node: ir.Node, x_mean: np.ndarray, weight_error: np.ndarray, opset: int) -> np.ndarray:
    """Mean over the data of op(x, weight_error) per output channel: the bias shift W_q - W causes.

    Runs ``node``'s own op type and attributes in onnxruntime on the mean input, so every
    attribute (pads, strides, dilations, groups, transA/transB, alpha) is honoured exactly.
    """
    return output_shifts(node, x_mean, weight_error, opset).mean(axis=0)


def output_shifts(node: ir.Node, x_means: np.ndarray, weight_error: np.ndarray, opset: int) -> np.ndarray:
    """`output_shift` for each of several mean inputs stacked on the first axis: [G, C]."""
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
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x_means.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight_error.astype(np.float32), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    (y,) = make_session(model, optimize=False, what=f"bias-shift model of node '{node.name}'").run(["y"], {"x": x_means.astype(np.float32)})
    # Output channels are axis 1 of every correctable op's output; the rest are positions.
    return np.asarray(y, dtype=np.float64).mean(axis=tuple(range(2, y.ndim)))


def shrunk_shift(group_shifts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The mean shift per channel from per-group shifts [G, C], shrunk towards zero by its
    sampling noise: m (1 - se^2 / m^2) where |m| > SIGNIFICANCE se, else 0, with
    se^2 = sum_g n_g (s_g - m)^2 / ((G - 1) N).

    With one group there is no noise estimate, and the mean is returned as it is.
    """
    group_shifts = np.asarray(group_shifts, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64).reshape(-1, 1)
    total = n.sum()
    m = (group_shifts * n).sum(axis=0) / total
    if len(group_shifts) < 2:
        return m
    se2 = (n * (group_shifts - m) ** 2).sum(axis=0) / ((len(group_shifts) - 1) * total)
    # Below two standard errors (about 95 % confidence) a shift is indistinguishable from noise.
    significant = m * m > SIGNIFICANCE**2 * se2
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.where(significant, 1.0 - se2 / (m * m), 0.0)
    return m * keep


def corrected_bias(node: ir.Node, model: ir.Model, x_means: InputMeans, weight: np.ndarray, dequantized: np.ndarray) -> np.ndarray | None:
    """The per-channel bias that cancels ``node``'s mean output shift from weight ``dequantized``
    on the data (shrunk by its sampling noise, see `shrunk_shift`), or None where the node's bias
    cannot hold a per-channel correction (a Gemm with transA, beta = 0, or a C that is not one
    value per output channel)."""
    roles = input_roles(node)
    bias_value = node.inputs[roles.bias] if roles.bias is not None else None
    beta = 1.0
    if node.op_type == "Gemm":
        if "transA" in node.attributes and node.attributes["transA"].as_int():
            return None  # the sample axis is not axis 0 of the input
        beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        if bias_value is not None and beta == 0.0:
            return None
    error = dequantized.astype(np.float64) - weight.astype(np.float64)
    shift = shrunk_shift(output_shifts(node, x_means.groups, error, opset_version(model)), x_means.counts)
    if bias_value is None:
        return (-shift).astype(np.float32)
    bias = constant_array(bias_value)
    if bias is None or bias.size not in (1, shift.size) or (bias.ndim > 1 and bias.shape[-1] != shift.size):
        return None
    return (np.broadcast_to(bias.astype(np.float64).reshape(-1), shift.shape) - shift / beta).astype(np.float32)
