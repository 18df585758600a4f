"""Tiny int8 models whose exact result differs from the one a VPMADDUBSW kernel (AVX2 / AVX512BW
without VNNI) gives, and numpy references for both.

All take uint8 activations (zero point 0) and int8 weights (zero point 0, per-tensor scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


def _save(graph: onnx.GraphProto, path: str | Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def qdq_matmul(path, w: np.ndarray, s_x: float, s_w: float, s_y: float, zp_y: int = 0) -> Path:
    """x float [M, K] -> Q(u8, s_x) -> DQ -> MatMul(., DQ(w int8 [K, N], s_w)) -> Q(u8, s_y, zp_y) -> DQ.

    With ORT_ENABLE_ALL onnxruntime fuses this into one QLinearMatMul (u8 x s8 QGEMM)."""
    k, n = w.shape
    inits = [
        numpy_helper.from_array(w.astype(np.int8), "w_q"),
        _scalar("s_x", s_x, np.float32), _scalar("zp_x", 0, np.uint8),
        _scalar("s_w", s_w, np.float32), _scalar("zp_w", 0, np.int8),
        _scalar("s_y", s_y, np.float32), _scalar("zp_y", zp_y, np.uint8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s_x", "zp_x"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["w_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y_f"]),
        helper.make_node("QuantizeLinear", ["y_f", "s_y", "zp_y"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "s_y", "zp_y"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    return _save(graph, path)


def qdq_conv(path, w: np.ndarray, s_x: float, s_w: float, s_y: float, zp_y: int = 0, pads=(0, 0, 0, 0),
             group: int = 1) -> Path:
    """x float [N, Cin, H, W] -> Q(u8) -> DQ -> Conv(., DQ(w int8 [Cout, Cin / group, kh, kw])) -> Q(u8) -> DQ.

    With ORT_ENABLE_ALL onnxruntime fuses this into one QLinearConv."""
    cout, cin, kh, kw = w.shape
    cin *= group
    inits = [
        numpy_helper.from_array(w.astype(np.int8), "w_q"),
        _scalar("s_x", s_x, np.float32), _scalar("zp_x", 0, np.uint8),
        _scalar("s_w", s_w, np.float32), _scalar("zp_w", 0, np.int8),
        _scalar("s_y", s_y, np.float32), _scalar("zp_y", zp_y, np.uint8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s_x", "zp_x"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["w_dq"]),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["y_f"], kernel_shape=[kh, kw], pads=list(pads), group=group),
        helper.make_node("QuantizeLinear", ["y_f", "s_y", "zp_y"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "s_y", "zp_y"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, "OH", "OW"])], inits)
    return _save(graph, path)


def matmul_integer(path, w: np.ndarray) -> Path:
    """x uint8 [M, K] -> MatMulInteger(x, w int8 [K, N]) -> int32 [M, N]: the raw accumulator."""
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "matmul_integer",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["M", n])],
        [numpy_helper.from_array(w.astype(np.int8), "w")])
    return _save(graph, path)


def exact_matmul(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """int32 accumulator of a [M, K] uint8 x w [K, N] int8, exactly."""
    return a_u8.astype(np.int64) @ w_s8.astype(np.int64)


def vpmaddubsw_matmul(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """What a VPMADDUBSW kernel computes: products of K-adjacent pairs (k even, k+1) summed into int16
    with saturation, then the pair sums added in int32."""
    a = a_u8.astype(np.int64)
    w = w_s8.astype(np.int64)
    k = a.shape[-1]
    if k % 2:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), np.int64)], axis=-1)
        w = np.concatenate([w, np.zeros((1,) + w.shape[1:], np.int64)], axis=0)
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def requantize(acc: np.ndarray, s_x: float, s_w: float, s_y: float, zp_y: int = 0) -> np.ndarray:
    """uint8 output code of an int32 accumulator (round half to even, as onnxruntime does)."""
    multiplier = np.float32(s_x) * np.float32(s_w) / np.float32(s_y)
    return np.clip(np.rint(acc.astype(np.float32) * multiplier) + zp_y, 0, 255).astype(np.uint8)
