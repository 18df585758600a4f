"""Small ONNX models built in code, and a runner, for exact unit tests of passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompiler.ir import to_proto
from qcompiler.runtime import make_session


def make_model(nodes, inputs, outputs, initializers, opset: int = 17) -> ir.Model:
    """An IR model from onnx.helper pieces (initializers as a name -> array dict)."""
    graph = helper.make_graph(
        nodes,
        "test",
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(np.asarray(a), name) for name, a in initializers.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def tensor_info(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def run(model: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    return make_session(proto, optimize=False).run(None, feed)


def bn_params(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        "beta": rng.normal(0, 1, channels).astype(np.float32),
        "mean": rng.normal(0, 1, channels).astype(np.float32),
        "var": rng.uniform(0.1, 3.0, channels).astype(np.float32),
    }


def bn_node(x: str, y: str, name: str = "bn", eps: float = 1e-3):
    return helper.make_node("BatchNormalization", [x, "gamma", "beta", "mean", "var"], [y], name=name, epsilon=eps)
