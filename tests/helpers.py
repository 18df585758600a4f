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


def small_cnn() -> ir.Model:
    """Conv-Relu-MaxPool, two Conv branches joined by Concat, Conv-Sigmoid, Conv, pool, Gemm:
    every rule has something to look at (shared scales, integer MaxPool, a float op, biases)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.5, shape).astype(np.float32)

    inits = {
        "w0": w(4, 3, 3, 3), "b0": w(4),
        "wa": w(4, 4, 1, 1), "ba": w(4),
        "wb": w(4, 4, 3, 3), "bb": w(4),
        "wc": w(6, 8, 1, 1), "bc": w(6),
        "wd": w(6, 6, 3, 3), "bd": w(6),
        "wf": w(5, 6), "bf": w(5),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("MaxPool", ["r0"], ["p0"], name="pool0", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p0", "wa", "ba"], ["ca"], name="conv_a"),
        helper.make_node("Conv", ["p0", "wb", "bb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ca", "cb"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["cc"], name="conv_c"),
        helper.make_node("Sigmoid", ["cc"], ["sc"], name="sigmoid"),
        helper.make_node("Conv", ["sc", "wd", "bd"], ["cd"], name="conv_d", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["cd"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [tensor_info("input", [None, 3, 8, 8])], [tensor_info("logits", [None, 5])], inits)


def small_bn_cnn(seed: int = 0) -> ir.Model:
    """Conv-BN-Relu twice (one BN channel with a negative scale), global pool, Gemm: what the
    low-bit training passes train with BN on batch statistics and then fold."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.5, shape).astype(np.float32)

    inits = {"w0": w(8, 3, 3, 3), "w1": w(8, 8, 3, 3), "wf": w(5, 8), "bf": w(5)}
    for i in (0, 1):
        p = bn_params(rng, 8)
        if i == 1:
            p["gamma"][2] = -p["gamma"][2]
        inits |= {f"{k}{i}": v for k, v in p.items()}
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "gamma0", "beta0", "mean0", "var0"], ["n0"], name="bn0", epsilon=1e-5),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma1", "beta1", "mean1", "var1"], ["n1"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [tensor_info("input", [None, 3, 8, 8])], [tensor_info("logits", [None, 5])], inits)


def load_script(relative: str):
    """A script of the repository (``bench/low_bit.py``, ``models/...``) imported as a module:
    its folder on ``sys.path`` (benches import each other), registered in ``sys.modules`` (its
    dataclasses resolve their annotations through it)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name = f"script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_matches_schema(payload: dict, kind: str) -> None:
    """``payload`` (a JSON file qc wrote, parsed) obeys the shipped JSON Schema of its kind."""
    import jsonschema

    from qcompiler.json_output import schema

    jsonschema.Draft202012Validator(schema(kind)).validate(payload)
