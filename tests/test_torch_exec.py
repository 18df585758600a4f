"""The ONNX -> torch executor (`qcompiler.torch_exec`) against onnxruntime, op by op, plus gradients.

Every op case is a single-node (or tiny) model built with `make_model`; the torch result must match
onnxruntime's (unoptimized) to 1e-5 * max(1, max|ref|), with equal shapes and dtypes, and exactly
for integer outputs and for QuantizeLinear / DequantizeLinear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import QCError
from qcompiler.ir import load_model
from qcompiler.torch_exec import TorchGraph
from tests.helpers import bn_params, make_model, run, tensor_info

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
CALIB = ROOT / "models" / "cifar10_calib.npz"

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
F = TensorProto.FLOAT

_RNG = np.random.default_rng(20240917)


def randn(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * _RNG.standard_normal(shape)).astype(np.float32)


def uniform(lo: float, hi: float, *shape: int) -> np.ndarray:
    return _RNG.uniform(lo, hi, shape).astype(np.float32)


def i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(value) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def node(op_type: str, inputs, outputs, **attrs):
    return helper.make_node(op_type, list(inputs), list(outputs), name=f"{op_type.lower()}_0", **attrs)


def build(nodes, feeds: dict[str, np.ndarray], outputs, inits=None, opset: int = 17) -> ir.Model:
    """`make_model` with graph inputs taken from ``feeds`` and output types found by shape inference."""
    inits = inits or {}
    inputs = [tensor_info(name, list(a.shape), helper.np_dtype_to_tensor_dtype(a.dtype)) for name, a in feeds.items()]
    probe = helper.make_graph(
        nodes, "probe", inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()],
    )
    proto = helper.make_model(probe, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    output_infos = list(inferred.graph.output)
    assert [o.name for o in output_infos] == list(outputs)
    return make_model(nodes, inputs, output_infos, inits, opset=opset)


CASES = []


def case(case_id, nodes, feeds, outputs, inits=None, opset=17, *, exact=False, check_dtype=True, marks=()):
    nodes = nodes if isinstance(nodes, list) else [nodes]
    spec = dict(nodes=nodes, feeds=feeds, outputs=outputs, inits=inits or {}, opset=opset, exact=exact, check_dtype=check_dtype)
    CASES.append(pytest.param(spec, id=case_id, marks=marks))


# -- Conv ----------------------------------------------------------------------------------------
def conv_case(case_id, x_shape, w_shape, bias=True, **attrs):
    inits = {"W": randn(*w_shape, scale=0.5)}
    ins = ["x", "W"]
    if bias:
        inits["B"] = randn(w_shape[0])
        ins.append("B")
    case(case_id, node("Conv", ins, ["y"], **attrs), {"x": randn(*x_shape)}, ["y"], inits)


conv_case("conv_sym_pads", [2, 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1])
conv_case("conv_asym_pads", [1, 3, 8, 8], [4, 3, 3, 3], pads=[0, 1, 1, 0])
conv_case("conv_strides2", [1, 3, 9, 9], [4, 3, 3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
conv_case("conv_dilations2", [1, 3, 9, 9], [4, 3, 3, 3], pads=[2, 2, 2, 2], dilations=[2, 2])
conv_case("conv_depthwise", [1, 4, 8, 8], [4, 1, 3, 3], pads=[1, 1, 1, 1], group=4)
conv_case("conv_group2", [1, 4, 6, 6], [6, 2, 3, 3], group=2)
conv_case("conv_same_upper", [1, 3, 8, 8], [4, 3, 4, 4], auto_pad="SAME_UPPER")
conv_case("conv_same_lower", [1, 3, 8, 8], [4, 3, 4, 4], auto_pad="SAME_LOWER")
conv_case("conv_same_upper_stride2", [1, 3, 7, 7], [4, 3, 3, 3], auto_pad="SAME_UPPER", strides=[2, 2])
conv_case("conv_same_lower_stride2", [1, 3, 8, 8], [4, 3, 4, 4], auto_pad="SAME_LOWER", strides=[2, 2])
conv_case("conv_valid", [1, 3, 8, 8], [4, 3, 3, 3], auto_pad="VALID")
conv_case("conv_1d", [2, 3, 10], [5, 3, 3], pads=[1, 1])
conv_case("conv_1d_asym_strided", [2, 3, 11], [5, 3, 3], pads=[0, 2], strides=[2])
conv_case("conv_no_bias", [1, 3, 8, 8], [4, 3, 3, 3], bias=False, pads=[1, 1, 1, 1])
conv_case("conv_no_bias_asym", [1, 3, 8, 8], [4, 3, 3, 3], bias=False, pads=[1, 0, 0, 2], strides=[2, 1])


# -- ConvTranspose ------------------------------------------------------------------------------
def conv_t_case(case_id, x_shape, w_shape, bias=True, **attrs):
    inits = {"W": randn(*w_shape, scale=0.5)}
    ins = ["x", "W"]
    if bias:
        inits["B"] = randn(w_shape[1] * attrs.get("group", 1))
        ins.append("B")
    case(case_id, node("ConvTranspose", ins, ["y"], **attrs), {"x": randn(*x_shape)}, ["y"], inits)


conv_t_case("convT_plain", [1, 4, 5, 5], [4, 3, 3, 3])
conv_t_case("convT_strides2", [1, 4, 5, 5], [4, 3, 3, 3], strides=[2, 2])
conv_t_case("convT_strides2_pads", [1, 4, 5, 5], [4, 3, 3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
conv_t_case("convT_output_padding", [1, 4, 5, 5], [4, 3, 3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
conv_t_case("convT_group2", [1, 4, 5, 5], [4, 2, 3, 3], strides=[2, 2], group=2)
conv_t_case("convT_asym_pads", [1, 4, 5, 5], [4, 3, 3, 3], bias=False, strides=[2, 2], pads=[0, 1, 1, 0])
conv_t_case("convT_1d_dilated", [2, 3, 6], [3, 2, 3], strides=[2], dilations=[2], pads=[1, 0])


# -- Gemm / MatMul --------------------------------------------------------------------------------
def gemm_case(case_id, a_shape, b_shape, c_shape=None, **attrs):
    inits = {"B": randn(*b_shape)}
    ins = ["a", "B"]
    if c_shape is not None:
        inits["C"] = randn(*c_shape)
        ins.append("C")
    case(case_id, node("Gemm", ins, ["y"], **attrs), {"a": randn(*a_shape)}, ["y"], inits)


gemm_case("gemm_plain_cN", [3, 4], [4, 5], [5])
gemm_case("gemm_c1N", [3, 4], [4, 5], [1, 5])
gemm_case("gemm_cMN", [3, 4], [4, 5], [3, 5])
gemm_case("gemm_transA", [4, 3], [4, 5], [5], transA=1)
gemm_case("gemm_transB", [3, 4], [5, 4], [5], transB=1)
gemm_case("gemm_transAB_alpha_beta", [4, 3], [5, 4], [1, 5], transA=1, transB=1, alpha=0.5, beta=2.0)
gemm_case("gemm_alpha_beta_cN", [3, 4], [4, 5], [5], alpha=-1.5, beta=0.25)
gemm_case("gemm_no_c", [3, 4], [5, 4], None, transB=1, alpha=2.0)

case("matmul_2d", node("MatMul", ["a", "b"], ["y"]), {"a": randn(3, 4), "b": randn(4, 5)}, ["y"])
case("matmul_3d_2d", node("MatMul", ["a", "b"], ["y"]), {"a": randn(2, 3, 4), "b": randn(4, 5)}, ["y"])
case("matmul_4d_4d", node("MatMul", ["a", "b"], ["y"]), {"a": randn(2, 3, 4, 5), "b": randn(2, 3, 5, 6)}, ["y"])
case("matmul_4d_bcast", node("MatMul", ["a", "b"], ["y"]), {"a": randn(2, 1, 4, 5), "b": randn(3, 5, 6)}, ["y"])


# -- elementwise --------------------------------------------------------------------------------
def nonzero(*shape):
    return (uniform(0.5, 2.0, *shape) * np.where(_RNG.random(shape) < 0.5, -1, 1)).astype(np.float32)


case("add_bcast", node("Add", ["a", "b"], ["y"]), {"a": randn(2, 3, 4), "b": randn(4)}, ["y"])
case("sub_bcast", node("Sub", ["a", "b"], ["y"]), {"a": randn(2, 1, 4), "b": randn(3, 1)}, ["y"])
case("mul_bcast", node("Mul", ["a", "b"], ["y"]), {"a": randn(2, 3, 4), "b": randn(1, 3, 1)}, ["y"])
case("div_bcast", node("Div", ["a", "b"], ["y"]), {"a": randn(2, 3, 4), "b": nonzero(3, 4)}, ["y"])
case("add_scalar_init", node("Add", ["a", "b"], ["y"]), {"a": randn(2, 3)}, ["y"], {"b": f32(0.75)})
case(
    "div_int64_trunc",
    node("Div", ["a", "b"], ["y"]),
    {"a": i64(-7, 7, -8, 8, -1, 0, 5, -5, 9, -9), "b": i64(2, 2, 3, -3, 2, 3, -2, -3, -4, 4)},
    ["y"],
)
case("div_int64_bcast", node("Div", ["a", "b"], ["y"]), {"a": i64(-7, 7, -1, 1, -9, 9).reshape(2, 3), "b": i64(2, -2, 4)}, ["y"])

case("relu", node("Relu", ["x"], ["y"]), {"x": randn(2, 3, 4)}, ["y"])
case("sigmoid", node("Sigmoid", ["x"], ["y"]), {"x": randn(2, 3, 4, scale=3)}, ["y"])
case("tanh", node("Tanh", ["x"], ["y"]), {"x": randn(2, 3, 4, scale=2)}, ["y"])
case("erf", node("Erf", ["x"], ["y"]), {"x": randn(2, 3, 4, scale=2)}, ["y"])
case("sqrt", node("Sqrt", ["x"], ["y"]), {"x": uniform(0.0, 9.0, 2, 3, 4)}, ["y"])
case("pow_float", node("Pow", ["a", "b"], ["y"]), {"a": uniform(0.1, 3.0, 2, 3), "b": uniform(-2.0, 2.0, 2, 3)}, ["y"])
case("pow_scalar_exponent", node("Pow", ["a", "b"], ["y"]), {"a": randn(2, 3)}, ["y"], {"b": f32(2.0)})
case("hard_sigmoid_default", node("HardSigmoid", ["x"], ["y"]), {"x": uniform(-5, 5, 4, 6)}, ["y"])
case("hard_sigmoid_alpha_beta", node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4), {"x": uniform(-5, 5, 4, 6)}, ["y"])
case("hard_swish", node("HardSwish", ["x"], ["y"]), {"x": uniform(-5, 5, 4, 6)}, ["y"], opset=14)
case("gelu_none", node("Gelu", ["x"], ["y"]), {"x": randn(4, 6, scale=2)}, ["y"], opset=20)
case("gelu_tanh", node("Gelu", ["x"], ["y"], approximate="tanh"), {"x": randn(4, 6, scale=2)}, ["y"], opset=20)

case("clip13_min_max", node("Clip", ["x", "lo", "hi"], ["y"]), {"x": randn(3, 5)}, ["y"], {"lo": f32(-0.5), "hi": f32(0.7)}, opset=13)
case("clip13_only_max", node("Clip", ["x", "", "hi"], ["y"]), {"x": randn(3, 5)}, ["y"], {"hi": f32(0.3)}, opset=13)
case("clip13_only_min", node("Clip", ["x", "lo"], ["y"]), {"x": randn(3, 5)}, ["y"], {"lo": f32(-0.2)}, opset=13)
case("clip13_none", node("Clip", ["x"], ["y"]), {"x": randn(3, 5)}, ["y"], opset=13)
case("clip6_attrs", node("Clip", ["x"], ["y"], min=-0.5, max=0.7), {"x": randn(3, 5)}, ["y"], opset=6)
case("clip6_only_max", node("Clip", ["x"], ["y"], max=0.1), {"x": randn(3, 5)}, ["y"], opset=6)

case("softmax13_last", node("Softmax", ["x"], ["y"], axis=-1), {"x": randn(2, 3, 4, scale=3)}, ["y"], opset=13)
case("softmax13_axis1", node("Softmax", ["x"], ["y"], axis=1), {"x": randn(2, 3, 4, scale=3)}, ["y"], opset=13)
case("softmax13_default", node("Softmax", ["x"], ["y"]), {"x": randn(2, 3, 4, scale=3)}, ["y"], opset=13)
case("softmax11_axis1_flattened", node("Softmax", ["x"], ["y"], axis=1), {"x": randn(2, 3, 4, scale=3)}, ["y"], opset=11)
case("softmax11_default", node("Softmax", ["x"], ["y"]), {"x": randn(2, 3, 4, scale=3)}, ["y"], opset=11)


# -- normalization ------------------------------------------------------------------------------
case(
    "layernorm_last_bias",
    node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1),
    {"x": randn(2, 3, 8, scale=2) + 1},
    ["y"],
    {"s": randn(8), "b": randn(8)},
)
case(
    "layernorm_axis1_bias",
    node("LayerNormalization", ["x", "s", "b"], ["y"], axis=1, epsilon=1e-3),
    {"x": randn(2, 3, 8, scale=2) - 1},
    ["y"],
    {"s": randn(3, 8), "b": randn(3, 8)},
)
case("layernorm_no_bias", node("LayerNormalization", ["x", "s"], ["y"]), {"x": randn(2, 3, 8)}, ["y"], {"s": randn(8)})
case(
    "layernorm_broadcast_scale",
    node("LayerNormalization", ["x", "s", "b"], ["y"], axis=1),
    {"x": randn(2, 3, 4)},
    ["y"],
    {"s": randn(4), "b": randn(1, 4)},
)
case(
    "layernorm_mean_invstddev_outputs",
    node("LayerNormalization", ["x", "s"], ["y", "mean", "inv_std"]),
    {"x": randn(2, 4)},
    ["y", "mean", "inv_std"],
    {"s": randn(4)},
)
case(
    "batchnorm_inference",
    node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3),
    {"x": randn(2, 4, 5, 5)},
    ["y"],
    bn_params(_RNG, 4),
)


# -- pooling ------------------------------------------------------------------------------------
def pool_case(case_id, op_type, x_shape, marks=(), **attrs):
    case(case_id, node(op_type, ["x"], ["y"], **attrs), {"x": randn(*x_shape)}, ["y"], marks=marks)


pool_case("maxpool_k3_s2_p1", "MaxPool", [1, 2, 9, 9], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
pool_case("maxpool_k3_s2_p1_even", "MaxPool", [1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
pool_case("maxpool_ceil", "MaxPool", [1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
pool_case("maxpool_ceil_pads", "MaxPool", [1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
pool_case("maxpool_asym_pads", "MaxPool", [1, 2, 7, 7], kernel_shape=[3, 3], strides=[1, 1], pads=[0, 1, 1, 0])
pool_case("maxpool_asym_pads_s2", "MaxPool", [1, 2, 8, 8], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 0, 1])
pool_case("maxpool_same_upper", "MaxPool", [1, 2, 7, 7], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")
pool_case("avgpool_pads_exclude", "AveragePool", [1, 2, 9, 9], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)
pool_case("avgpool_pads_include", "AveragePool", [1, 2, 9, 9], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
pool_case("avgpool_ceil", "AveragePool", [1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
pool_case("avgpool_ceil_pads_exclude", "AveragePool", [1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
pool_case(
    "avgpool_ceil_pads_include", "AveragePool", [1, 2, 8, 8],
    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1,
)
pool_case("avgpool_asym_pads_exclude", "AveragePool", [1, 2, 7, 7], kernel_shape=[3, 3], pads=[0, 1, 1, 0], count_include_pad=0)
pool_case("avgpool_asym_pads_include", "AveragePool", [1, 2, 7, 7], kernel_shape=[3, 3], pads=[0, 1, 1, 0], count_include_pad=1)
pool_case("maxpool_ceil_asym_pads", "MaxPool", [1, 2, 5, 5], kernel_shape=[3, 3], strides=[3, 3], pads=[0, 0, 2, 2], ceil_mode=1)
pool_case("maxpool_ceil_big_pads", "MaxPool", [1, 1, 8, 8], kernel_shape=[3, 3], strides=[2, 2], pads=[2, 2, 2, 2], ceil_mode=1)
pool_case(
    "avgpool_ceil_asym_pads_include", "AveragePool", [1, 2, 5, 5],
    kernel_shape=[3, 3], strides=[3, 3], pads=[0, 0, 2, 2], ceil_mode=1, count_include_pad=1,
)
pool_case(
    "avgpool_ceil_asym_pads_exclude", "AveragePool", [1, 2, 6, 6],
    kernel_shape=[2, 2], strides=[3, 3], pads=[0, 0, 1, 1], ceil_mode=1, count_include_pad=0,
)
pool_case("global_avgpool", "GlobalAveragePool", [2, 3, 5, 6])
pool_case("global_maxpool", "GlobalMaxPool", [2, 3, 5, 6])


# -- shapes and data movement -------------------------------------------------------------------
for _axis in (0, 1, 2, -1):
    case(f"flatten_axis{_axis}", node("Flatten", ["x"], ["y"], axis=_axis), {"x": randn(2, 3, 4, 5)}, ["y"])
case("flatten_default", node("Flatten", ["x"], ["y"]), {"x": randn(2, 3, 4, 5)}, ["y"])
case(
    "flatten_axis_rank",
    node("Flatten", ["x"], ["y"], axis=4),
    {"x": randn(2, 3, 4, 5)},
    ["y"],
)
case(
    "flatten_1d_axis1",
    node("Flatten", ["x"], ["y"], axis=1),
    {"x": randn(5)},
    ["y"],
)

case("reshape_zero_minus1", node("Reshape", ["x", "s"], ["y"]), {"x": randn(2, 3, 4)}, ["y"], {"s": i64(0, -1)})
case("reshape_zeros_split", node("Reshape", ["x", "s"], ["y"], allowzero=0), {"x": randn(2, 3, 4)}, ["y"], {"s": i64(0, 0, 2, -1)})
case("reshape_minus1_first", node("Reshape", ["x", "s"], ["y"]), {"x": randn(2, 3, 4)}, ["y"], {"s": i64(-1, 4)})
case("reshape_shape_input", node("Reshape", ["x", "s"], ["y"]), {"x": randn(2, 3, 4), "s": i64(4, 0, -1)}, ["y"])

case("transpose_perm", node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1]), {"x": randn(2, 3, 4, 5)}, ["y"])
case("transpose_default", node("Transpose", ["x"], ["y"]), {"x": randn(2, 3, 4)}, ["y"])

case("concat_axis1", node("Concat", ["a", "b", "c"], ["y"], axis=1), {"a": randn(2, 1, 3), "b": randn(2, 2, 3), "c": randn(2, 3, 3)}, ["y"])
case("concat_neg_axis", node("Concat", ["a", "b"], ["y"], axis=-1), {"a": randn(2, 3, 1), "b": randn(2, 3, 4)}, ["y"])

case(
    "split13_input",
    node("Split", ["x", "s"], ["y0", "y1", "y2"], axis=1),
    {"x": randn(2, 6, 3)},
    ["y0", "y1", "y2"],
    {"s": i64(2, 3, 1)},
    opset=13,
)
case("split13_equal", node("Split", ["x"], ["y0", "y1", "y2"], axis=-1), {"x": randn(2, 6)}, ["y0", "y1", "y2"], opset=13)
case("split11_attr", node("Split", ["x"], ["y0", "y1"], axis=0, split=[1, 3]), {"x": randn(4, 2)}, ["y0", "y1"], opset=11)
case(
    "split18_num_outputs_uneven",
    node("Split", ["x"], ["y0", "y1", "y2"], axis=1, num_outputs=3),
    {"x": randn(2, 7)},
    ["y0", "y1", "y2"],
    opset=18,
)
case(
    "split18_num_outputs_uneven8",
    node("Split", ["x"], ["y0", "y1", "y2"], axis=0, num_outputs=3),
    {"x": randn(8, 2)},
    ["y0", "y1", "y2"],
    opset=18,
)


def slice_case(case_id, x_shape, starts, ends, axes=None, steps=None, marks=()):
    ins, inits = ["x", "st", "en"], {"st": i64(*starts), "en": i64(*ends)}
    if axes is not None:
        ins.append("ax")
        inits["ax"] = i64(*axes)
    if steps is not None:
        if axes is None:
            ins.append("")
        ins.append("sp")
        inits["sp"] = i64(*steps)
    case(case_id, node("Slice", ins, ["y"]), {"x": randn(*x_shape)}, ["y"], inits, opset=13, marks=marks)


slice_case("slice_neg_starts_ends", [3, 8, 5], [-3], [-1], [1])
slice_case("slice_steps2", [3, 8, 7], [0, 1], [8, 7], [1, 2], [2, 2])
slice_case("slice_neg_step1_full", [3, 8], [-1], [INT64_MIN], [1], [-1])
slice_case("slice_neg_step1_partial", [3, 8], [5], [1], [1], [-1])
slice_case("slice_neg_step2", [3, 8], [6], [0], [-1], [-2])
slice_case("slice_neg_step2_from_end", [3, 9], [INT64_MAX], [INT64_MIN], [1], [-2])
slice_case("slice_axes_subset_neg_axis", [2, 3, 8], [1], [5], [-1])
slice_case("slice_ends_int64_max", [4, 6], [2], [INT64_MAX], [1])
slice_case("slice_no_axes", [4, 6], [1, 2], [3, 5])
slice_case("slice_starts_beyond", [4, 6], [10], [20], [1])
slice_case("slice_neg_step_start_beyond", [4, 6], [100], [-100], [1], [-1])
slice_case(
    "slice_neg_step_start_below_dim",
    [4, 6],
    [-100],
    [INT64_MIN],
    [1],
    [-1],
)

case("squeeze13_axes", node("Squeeze", ["x", "a"], ["y"]), {"x": randn(2, 1, 3, 1)}, ["y"], {"a": i64(1, -1)}, opset=13)
case("squeeze13_no_axes", node("Squeeze", ["x"], ["y"]), {"x": randn(1, 3, 1, 2)}, ["y"], opset=13)
case("squeeze11_attr", node("Squeeze", ["x"], ["y"], axes=[0, 2]), {"x": randn(1, 3, 1, 2)}, ["y"], opset=11)
case("unsqueeze13_axes", node("Unsqueeze", ["x", "a"], ["y"]), {"x": randn(2, 3)}, ["y"], {"a": i64(0, -1)}, opset=13)
case("unsqueeze13_middle", node("Unsqueeze", ["x", "a"], ["y"]), {"x": randn(2, 3)}, ["y"], {"a": i64(1, 3)}, opset=13)
case("unsqueeze11_attr", node("Unsqueeze", ["x"], ["y"], axes=[1, -1]), {"x": randn(2, 3)}, ["y"], opset=11)

case("gather_axis0_neg", node("Gather", ["x", "i"], ["y"], axis=0), {"x": randn(5, 3), "i": i64(2, 0, -1, -5)}, ["y"])
case("gather_axis1_2d", node("Gather", ["x", "i"], ["y"], axis=1), {"x": randn(2, 5, 3), "i": i64(0, -1, 1, 2).reshape(2, 2)}, ["y"])
case("gather_scalar_index", node("Gather", ["x", "i"], ["y"], axis=1), {"x": randn(2, 5, 3)}, ["y"], {"i": np.array(-2, dtype=np.int64)})
case("gather_scalar_axis0", node("Gather", ["x", "i"], ["y"]), {"x": randn(4, 3)}, ["y"], {"i": np.array(1, dtype=np.int64)})

case("shape_plain", node("Shape", ["x"], ["y"]), {"x": randn(2, 3, 4, 5)}, ["y"])
case("shape15_start_end", node("Shape", ["x"], ["y"], start=1, end=-1), {"x": randn(2, 3, 4, 5)}, ["y"], opset=15)
case("shape15_neg_start", node("Shape", ["x"], ["y"], start=-2), {"x": randn(2, 3, 4, 5)}, ["y"], opset=15)
case("shape15_end_only", node("Shape", ["x"], ["y"], end=2), {"x": randn(2, 3, 4, 5)}, ["y"], opset=15)

case(
    "pad13_constant_value",
    node("Pad", ["x", "p", "v"], ["y"], mode="constant"),
    {"x": randn(1, 2, 4, 4)},
    ["y"],
    {"p": i64(0, 0, 1, 2, 0, 0, 2, 1), "v": f32(1.5)},
    opset=13,
)
case("pad13_constant_default", node("Pad", ["x", "p"], ["y"]), {"x": randn(2, 3)}, ["y"], {"p": i64(1, 0, 0, 2)}, opset=13)
case(
    "pad13_reflect",
    node("Pad", ["x", "p"], ["y"], mode="reflect"),
    {"x": randn(1, 2, 5, 5)},
    ["y"],
    {"p": i64(0, 0, 2, 1, 0, 0, 1, 2)},
    opset=13,
)
case(
    "pad13_edge",
    node("Pad", ["x", "p"], ["y"], mode="edge"),
    {"x": randn(1, 2, 4, 4)},
    ["y"],
    {"p": i64(0, 0, 3, 1, 0, 0, 0, 2)},
    opset=13,
)
case(
    "pad18_axes",
    node("Pad", ["x", "p", "v", "a"], ["y"]),
    {"x": randn(1, 2, 4, 4)},
    ["y"],
    {"p": i64(1, 2, 3, 0), "v": f32(-2.0), "a": i64(2, -1)},
    opset=18,
)
case(
    "pad18_axes_reflect",
    node("Pad", ["x", "p", "", "a"], ["y"], mode="reflect"),
    {"x": randn(1, 2, 4, 5)},
    ["y"],
    {"p": i64(2, 1), "a": i64(3)},
    opset=18,
)

case("reducemean13_keep", node("ReduceMean", ["x"], ["y"], axes=[1]), {"x": randn(2, 3, 4)}, ["y"], opset=13)
case("reducemean13_nokeep", node("ReduceMean", ["x"], ["y"], axes=[1, -1], keepdims=0), {"x": randn(2, 3, 4)}, ["y"], opset=13)
case("reducemean13_no_axes", node("ReduceMean", ["x"], ["y"]), {"x": randn(2, 3, 4)}, ["y"], opset=13)
case("reducemean13_no_axes_nokeep", node("ReduceMean", ["x"], ["y"], keepdims=0), {"x": randn(2, 3, 4)}, ["y"], opset=13)
case("reducemean18_axes_input", node("ReduceMean", ["x", "a"], ["y"]), {"x": randn(2, 3, 4)}, ["y"], {"a": i64(-1)}, opset=18)
case(
    "reducemean18_axes_input_nokeep",
    node("ReduceMean", ["x", "a"], ["y"], keepdims=0),
    {"x": randn(2, 3, 4)},
    ["y"],
    {"a": i64(0, 2)},
    opset=18,
)
case("reducemean18_no_axes", node("ReduceMean", ["x"], ["y"]), {"x": randn(2, 3, 4)}, ["y"], opset=18)
case("reducesum13_axes_input", node("ReduceSum", ["x", "a"], ["y"]), {"x": randn(2, 3, 4)}, ["y"], {"a": i64(0, 2)}, opset=13)
case(
    "reducesum13_axes_input_nokeep",
    node("ReduceSum", ["x", "a"], ["y"], keepdims=0),
    {"x": randn(2, 3, 4)},
    ["y"],
    {"a": i64(1)},
    opset=13,
)
case("reducesum13_no_axes", node("ReduceSum", ["x"], ["y"]), {"x": randn(2, 3, 4)}, ["y"], opset=13)
case("reducesum11_attr", node("ReduceSum", ["x"], ["y"], axes=[1]), {"x": randn(2, 3, 4)}, ["y"], opset=11)


# -- constants, casts, selection -------------------------------------------------------------------
case(
    "constant_value_tensor",
    [
        helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(randn(2, 3), "c")),
        node("Add", ["x", "c"], ["y"]),
    ],
    {"x": randn(2, 3)},
    ["y", "c"],
)
case(
    "constant_value_float",
    [helper.make_node("Constant", [], ["c"], name="const", value_float=0.25), node("Mul", ["x", "c"], ["y"])],
    {"x": randn(2, 3)},
    ["y", "c"],
)
case(
    "constant_value_floats",
    [helper.make_node("Constant", [], ["c"], name="const", value_floats=[0.5, -1.0, 2.0]), node("Add", ["x", "c"], ["y"])],
    {"x": randn(2, 3)},
    ["y", "c"],
)
case(
    "constant_value_ints",
    [helper.make_node("Constant", [], ["s"], name="const", value_ints=[3, -1]), node("Reshape", ["x", "s"], ["y"])],
    {"x": randn(2, 3, 2)},
    ["y", "s"],
)
case(
    "constant_value_int",
    [helper.make_node("Constant", [], ["c"], name="const", value_int=3), node("Add", ["x", "c"], ["y"])],
    {"x": i64(1, -2, 5)},
    ["y", "c"],
)
case(
    "constant_of_shape_value",
    node("ConstantOfShape", ["s"], ["y"], value=numpy_helper.from_array(f32([1.5]))),
    {},
    ["y"],
    {"s": i64(2, 3)},
)
case("constant_of_shape_default", node("ConstantOfShape", ["s"], ["y"]), {"s": i64(3, 1, 2)}, ["y"])
case(
    "constant_of_shape_int64",
    node("ConstantOfShape", ["s"], ["y"], value=numpy_helper.from_array(i64(7))),
    {"s": i64(2, 2)},
    ["y"],
)
case(
    "cast_float_int_float",
    [
        helper.make_node("Cast", ["x"], ["i"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Cast", ["i"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ],
    {"x": uniform(-5, 5, 3, 4)},
    ["i", "y"],
)
case("identity", node("Identity", ["x"], ["y"]), {"x": randn(2, 3)}, ["y"])
case("expand_one_way", node("Expand", ["x", "s"], ["y"]), {"x": randn(3, 1)}, ["y"], {"s": i64(2, 3, 4)})
case("expand_bidirectional", node("Expand", ["x", "s"], ["y"]), {"x": randn(2, 1, 4)}, ["y"], {"s": i64(3, 1)})
case("expand_int64", node("Expand", ["x", "s"], ["y"]), {"x": i64(1, -2, 3)}, ["y"], {"s": i64(2, 3)})
case(
    "where_equal",
    [node("Equal", ["a", "b"], ["c"]), node("Where", ["c", "x", "z"], ["y"])],
    {"a": _RNG.integers(0, 3, (3, 4)), "b": _RNG.integers(0, 3, (4,)), "x": randn(3, 4), "z": randn(1, 4)},
    ["c", "y"],
)


# -- QuantizeLinear / DequantizeLinear: exact, ties to even ---------------------------------------
def with_ties(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Put exact half-way cases (x/scale = k + 0.5, e.g. 2.5, -0.5, 0.5, -1.5) at the front."""
    ties = np.array([2.5, -0.5, 0.5, -1.5, 1.5, 3.5, -2.5, 127.5 - zero_point, -128.5 - zero_point], np.float32) * scale
    flat = values.reshape(-1).copy()
    flat[: len(ties)] = ties
    return flat.reshape(values.shape)


case(
    "qdq_uint8_per_tensor",
    [node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
    {"x": with_ties(uniform(-40, 100, 4, 16), 0.5, 0) + np.float32(0)},
    ["q", "y"],
    {"s": f32(0.5), "z": np.array(128, np.uint8)},
    opset=13,
    exact=True,
    check_dtype=False,  # the executor keeps quantized values as float (for straight-through gradients)
)
case(
    "qdq_uint8_per_tensor_scale01",
    [node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
    {"x": uniform(-2, 25, 8, 32)},
    ["q", "y"],
    {"s": f32(0.1), "z": np.array(10, np.uint8)},
    opset=13,
    exact=True,
    check_dtype=False,
)
_w = randn(4, 3, 3, 3)
_w.reshape(4, -1)[:, :4] = np.array([2.5, -0.5, 0.5, -1.5], np.float32) * np.array([0.25, 0.125, 0.5, 0.0625], np.float32)[:, None]
_w[3, 2] = 20.0  # saturates at 127 (scale 0.0625)
case(
    "qdq_int8_per_channel_weight_axis0",
    [
        helper.make_node("QuantizeLinear", ["W", "s", "z"], ["q"], name="q", axis=0),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wq"], name="dq", axis=0),
        node("Conv", ["x", "wq"], ["y"], pads=[1, 1, 1, 1]),
    ],
    {"x": randn(1, 3, 5, 5)},
    ["q", "wq", "y"],
    {"W": _w, "s": f32([0.25, 0.125, 0.5, 0.0625]), "z": np.zeros(4, np.int8)},
    opset=13,
    check_dtype=False,
)
case(
    "qdq_int8_per_channel_activations_axis1",
    [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q", axis=1),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq", axis=1),
    ],
    {"x": np.concatenate([
        with_ties(uniform(-40, 40, 2, 1, 4, 4), 0.25, -3),
        with_ties(uniform(-40, 40, 2, 1, 4, 4), 0.5, 5),
        with_ties(uniform(-40, 40, 2, 1, 4, 4), 0.125, 0),
    ], axis=1)},
    ["q", "y"],
    {"s": f32([0.25, 0.5, 0.125]), "z": np.array([-3, 5, 0], np.int8)},
    opset=13,
    exact=True,
    check_dtype=False,
)
case(
    "q_int8_zero_point_from_constant_node",
    [
        helper.make_node("Constant", [], ["z"], name="zp", value=numpy_helper.from_array(np.array(0, np.int8))),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ],
    {"x": f32([-200.0, -100.0, -1.3, 0.26, 100.0, 200.0])},
    ["q", "y"],
    {"s": f32(1.0)},
    opset=13,
    exact=True,
    check_dtype=False,
)
case(
    "dq_int8_weight_initializer_axis0",
    [helper.make_node("DequantizeLinear", ["qw", "s", "z"], ["w"], name="dq", axis=0), node("MatMul", ["x", "w"], ["y"])],
    {"x": randn(2, 4)},
    ["w", "y"],
    {"qw": _RNG.integers(-128, 128, (4, 5)).astype(np.int8), "s": f32([0.1, 0.02, 0.5, 0.25]), "z": np.array([0, 1, -2, 3], np.int8)},
    opset=13,
)
case(
    "dq_uint8_per_tensor_input",
    helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    {"q": _RNG.integers(0, 256, (3, 7)).astype(np.uint8)},
    ["y"],
    {"s": f32(0.037), "z": np.array(131, np.uint8)},
    opset=13,
    exact=True,
)


def _compare(name: str, got: torch.Tensor, ref: np.ndarray, *, exact: bool, check_dtype: bool) -> None:
    got_np = got.detach().cpu().numpy()
    assert got_np.shape == ref.shape, f"{name}: shape {got_np.shape} != onnxruntime {ref.shape}"
    if check_dtype:
        assert got_np.dtype == ref.dtype, f"{name}: dtype {got_np.dtype} != onnxruntime {ref.dtype}"
    if exact or ref.dtype.kind in "biu":
        diff = np.nonzero(np.atleast_1d(got_np.astype(np.float64) != ref.astype(np.float64)))
        got_np, ref = np.atleast_1d(got_np), np.atleast_1d(ref)
        assert diff[0].size == 0, (
            f"{name}: {diff[0].size} mismatches, first at {tuple(d[0] for d in diff)}: "
            f"{got_np[tuple(d[0] for d in diff)]} != {ref[tuple(d[0] for d in diff)]}"
        )
        return
    if ref.size == 0:
        return
    err = float(np.max(np.abs(got_np.astype(np.float64) - ref.astype(np.float64))))
    tol = 1e-5 * max(1.0, float(np.max(np.abs(ref))))
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("spec", CASES)
def test_op_matches_onnxruntime(spec):
    model = build(spec["nodes"], spec["feeds"], spec["outputs"], spec["inits"], spec["opset"])
    refs = run(model, spec["feeds"])
    with torch.no_grad():
        got = TorchGraph(model).run({k: v.copy() for k, v in spec["feeds"].items()})
    assert list(got) == list(spec["outputs"])
    for name, ref in zip(spec["outputs"], refs):
        _compare(name, got[name], ref, exact=spec["exact"], check_dtype=spec["check_dtype"])


def test_quantize_ties_round_to_even_values():
    """The tie cases really are ties, and both sides round them to even (2.5 -> 2, -0.5 -> 0)."""
    x = f32([1.25, -0.25, 0.25, -0.75, 0.75, 1.75])  # x / 0.5 = 2.5, -0.5, 0.5, -1.5, 1.5, 3.5
    model = build(
        [node("QuantizeLinear", ["x", "s", "z"], ["q"])], {"x": x}, ["q"], {"s": f32(0.5), "z": np.array(0, np.int8)}, opset=13
    )
    expected = np.array([2, 0, 0, -2, 2, 4])
    np.testing.assert_array_equal(run(model, {"x": x})[0], expected)
    np.testing.assert_array_equal(TorchGraph(model).run({"x": x})["q"].detach().numpy(), expected)


# -- unsupported ops ------------------------------------------------------------------------------
def test_unsupported_standard_op_names_op_and_node():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="first_relu"), helper.make_node("Sin", ["r"], ["y"], name="the_sine")],
        [tensor_info("x", [2, 3])],
        [tensor_info("y", [2, 3])],
        {},
    )
    with pytest.raises(QCError) as info:
        TorchGraph(model)
    assert "Sin" in str(info.value) and "the_sine" in str(info.value)


def test_unsupported_custom_domain_op_names_op_and_node():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="r0"), helper.make_node("FancyOp", ["r"], ["y"], name="fancy_node", domain="com.example")],
        "custom",
        [tensor_info("x", [2, 3])],
        [tensor_info("y", [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(QCError) as info:
        TorchGraph(model)
    assert "FancyOp" in str(info.value) and "fancy_node" in str(info.value)


def test_custom_domain_op_with_standard_name_is_refused():
    """A custom-domain op is refused even when its name collides with a supported standard op."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="fake_relu", domain="com.example")],
        "custom",
        [tensor_info("x", [2, 3])],
        [tensor_info("y", [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    proto.ir_version = 8
    with pytest.raises(QCError) as info:
        TorchGraph(ir.serde.deserialize_model(proto))
    assert "Relu" in str(info.value) and "fake_relu" in str(info.value)


# -- gradients ------------------------------------------------------------------------------------
def _mlp_model() -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    weights = {"W1": rng.normal(0, 0.6, (3, 5)).astype(np.float32), "W2": rng.normal(0, 0.6, (5, 2)).astype(np.float32)}
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
            helper.make_node("MatMul", ["t", "W2"], ["y"], name="mm2"),
        ],
        [tensor_info("x", [4, 3])],
        [tensor_info("y", [4, 2])],
        weights,
    )
    return model, weights


def test_hessian_vector_product_matches_finite_differences():
    model, _ = _mlp_model()
    graph = TorchGraph(model, trainable=["W1", "W2"], dtype=torch.float64)
    params = [graph.parameter("W1"), graph.parameter("W2")]
    assert all(p.dtype == torch.float64 for p in params)
    x = torch.from_numpy(np.random.default_rng(8).normal(0, 1, (4, 3)))

    def grads(create_graph: bool) -> list[torch.Tensor]:
        loss = (graph(x)[0] ** 2).sum()
        return list(torch.autograd.grad(loss, params, create_graph=create_graph))

    gen = torch.Generator().manual_seed(9)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    g = grads(create_graph=True)
    hvp = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)
    hvp_flat = torch.cat([h.reshape(-1) for h in hvp])

    eps = 1e-6
    with torch.no_grad():
        originals = [p.detach().clone() for p in params]
        for p, vi, o in zip(params, v, originals):
            p.copy_(o + eps * vi)
    g_plus = grads(create_graph=False)
    with torch.no_grad():
        for p, vi, o in zip(params, v, originals):
            p.copy_(o - eps * vi)
    g_minus = grads(create_graph=False)
    with torch.no_grad():
        for p, o in zip(params, originals):
            p.copy_(o)
    fd_flat = torch.cat([((a - b) / (2 * eps)).reshape(-1) for a, b in zip(g_plus, g_minus)])
    rel = float((hvp_flat - fd_flat).norm() / hvp_flat.norm())
    assert rel <= 1e-6, f"H v differs from finite differences by {rel:.3g} (relative)"
    assert float(hvp_flat.norm()) > 1e-3  # non-trivial


@pytest.mark.parametrize(
    "zp, scale, inside, outside",
    [
        (np.array(10, np.uint8), 0.1, np.linspace(-0.9, 24.4, 40), [-5.0, -1.2, 24.8, 30.0, 100.0]),
        (np.array(0, np.int8), 0.25, np.linspace(-31.8, 31.6, 40), [-40.0, -32.3, 32.0, 50.0]),
    ],
    ids=["uint8", "int8"],
)
def test_qdq_straight_through_gradient(zp, scale, inside, outside):
    model = make_model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
        ],
        [tensor_info("x", [len(inside) + len(outside)])],
        [tensor_info("y", [len(inside) + len(outside)])],
        {"s": f32(scale), "z": zp},
        opset=13,
    )
    values = np.concatenate([inside, outside]).astype(np.float32)
    x = torch.tensor(values, requires_grad=True)
    y = TorchGraph(model)(x)[0]
    # The forward pass still quantizes.
    np.testing.assert_array_equal(y.detach().numpy(), run(model, {"x": values})[0])
    (grad,) = torch.autograd.grad(y.sum(), x)
    expected = np.concatenate([np.ones(len(inside)), np.zeros(len(outside))]).astype(np.float32)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=0, atol=1e-6)


def test_named_weights_are_trainable_parameters():
    model, weights = _mlp_model()
    graph = TorchGraph(model, trainable=["W2"])
    named = graph.named_weights()
    assert set(named) == {"W2"}
    param = named["W2"]
    assert isinstance(param, torch.nn.Parameter) and param.requires_grad
    assert param is graph.parameter("W2")
    np.testing.assert_array_equal(param.detach().numpy(), weights["W2"])
    assert {id(p) for p in graph.parameters()} == {id(param)}
    # The gradient reaches the parameter and not the constant weight.
    loss = graph(torch.ones(4, 3))[0].sum()
    loss.backward()
    assert param.grad is not None and param.grad.shape == (5, 2)

    both = TorchGraph(model, trainable=["W1", "W2"]).named_weights()
    assert set(both) == {"W1", "W2"} and all(p.requires_grad for p in both.values())
    assert TorchGraph(model).named_weights() == {}


def test_unknown_trainable_name_raises():
    model, _ = _mlp_model()
    with pytest.raises(QCError) as info:
        TorchGraph(model, trainable=["W1", "no_such_weight"])
    assert "no_such_weight" in str(info.value)


# -- shared CIFAR-10 ResNets ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_images() -> np.ndarray:
    if not CALIB.exists():
        pytest.skip(f"{CALIB} not available")
    with np.load(CALIB) as data:
        return np.ascontiguousarray(data["input"][:16])


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_shared_resnet_matches_onnxruntime(depth, calib_images):
    path = SHARED_MODELS / f"cifar10_resnet{depth}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not available")
    model = load_model(path)
    input_name = model.graph.inputs[0].name
    ref = run(model, {input_name: calib_images})[0]
    with torch.no_grad():
        got = TorchGraph(model)(torch.from_numpy(calib_images))[0].numpy()
    assert got.shape == ref.shape == (16, 10)
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert rel <= 1e-4, f"resnet{depth}: max relative error {rel:.3g}"


def test_average_pool_with_dilations_is_refused_by_name() -> None:
    model = build([node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])], {"x": randn(1, 1, 6, 6)}, ["y"], opset=19)
    with pytest.raises(QCError, match="dilations") as info:
        TorchGraph(model).run({"x": randn(1, 1, 6, 6)})
    assert info.value.node == "averagepool_0"
