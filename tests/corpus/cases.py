"""The corpus: each case writes its files into a folder and says what ``qc`` must do with them.

A case expects one of:

- ``ok``: exit 0; the written model passes the ONNX checker, runs in onnxruntime, is clean under
  ``qc validate`` for its target, and its report gives an output SQNR at or above the accuracy
  guard's threshold (or the guard's note says why not).
- ``error``: exit 2, one line on stderr starting ``error:`` that contains ``culprit``, no output
  folder written, every input file unchanged.
- ``guard``: exit 1 with the accuracy guard's line; the best model found is written.

Builders are plain functions registered with :func:`case`; parametrised families register one
case per variant, so every case has a stable name a test can select (``-k opset_7``).
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: The arguments every compile case starts from: small calibration, no latency timing.
COMPILE = ("compile", "model.onnx", "--calib", "calib.npz", "-o", "out", "--latency-runs", "0", "--calib-count", "16")
#: All the calibration file's samples (where 16 cannot pin down a range, as with branches).
COMPILE_ALL = COMPILE[:-2]


@dataclass
class Case:
    """What ``qc`` must do with the files a builder wrote."""

    expect: str  # "ok" | "error" | "guard"
    argv: tuple[str, ...] = COMPILE
    culprit: str = ""  # a piece of the error line that names the thing at fault
    target: str = "ort-cpu"  # the target an ``ok`` output is validated for
    output: str = "out"  # the folder an ``ok`` case writes
    calib: str = "calib.npz"  # the data an ``ok`` output is run on
    note: str = ""


Builder = Callable[[Path], Case]
CASES: dict[str, Builder] = {}


def case(name: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        if name in CASES:
            raise ValueError(f"duplicate corpus case {name}")
        CASES[name] = builder
        return builder

    return register


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

RNG_SEED = 17


def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def weight(*shape: int, scale: float = 0.4) -> np.ndarray:
    return rng().normal(0, scale, shape).astype(np.float32)


def ir_version_for(opset: int) -> int:
    # The oldest IR version that carries the opset: onnxruntime refuses a model whose IR version
    # is newer than it knows, and the checker one whose opset is newer than its IR version.
    return 3 if opset <= 8 else 4 if opset <= 10 else 6 if opset <= 12 else 7 if opset <= 14 else 8 if opset <= 18 else 9 if opset <= 20 else 10


def model_proto(nodes, inputs, outputs, inits: dict[str, np.ndarray] | None = None, *, opset: int = 17, extra_opsets=(), value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "corpus",
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()],
        value_info=list(value_info),
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    if ir_version_for(opset) < 4:
        # Before IR 4 every initializer had to be declared as a graph input too.
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer)
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="qcompiler-corpus")
    proto.ir_version = ir_version_for(opset)
    return proto


def vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def save(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def images(n: int = 16, shape=(3, 8, 8)) -> np.ndarray:
    return rng().normal(0, 1, (n, *shape)).astype(np.float32)


def cnn(opset: int = 17, *, batch=None, spatial=(8, 8)) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm: the plain case every variant starts from."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = {"w0": weight(8, 3, 3, 3), "b0": weight(8, scale=0.1), "w1": weight(8, 8, 3, 3, scale=0.2), "b1": weight(8, scale=0.1), "wf": weight(5, 8), "bf": weight(5, scale=0.1)}
    return model_proto(nodes, [vi("x", [batch, 3, *spatial])], [vi("y", [batch, 5])], inits, opset=opset)


def plain(folder: Path, proto: onnx.ModelProto | None = None, calib: dict[str, np.ndarray] | None = None) -> None:
    save(proto if proto is not None else cnn(), folder / "model.onnx")
    save_npz(folder / "calib.npz", **(calib if calib is not None else {"x": images()}))


# --------------------------------------------------------------------------------------------
# files that are not ONNX models
# --------------------------------------------------------------------------------------------


@case("file_empty")
def _(d: Path) -> Case:
    (d / "model.onnx").write_bytes(b"")
    save_npz(d / "calib.npz", x=images())
    return Case("error", culprit="model.onnx")


@case("file_random_bytes")
def _(d: Path) -> Case:
    (d / "model.onnx").write_bytes(rng().integers(0, 256, 4096, dtype=np.uint8).tobytes())
    save_npz(d / "calib.npz", x=images())
    return Case("error", culprit="model.onnx")


@case("file_truncated")
def _(d: Path) -> Case:
    data = cnn().SerializeToString()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    save_npz(d / "calib.npz", x=images())
    return Case("error", culprit="model.onnx")


@case("file_text")
def _(d: Path) -> Case:
    (d / "model.onnx").write_text('{"this": "is json, not onnx"}\n')
    save_npz(d / "calib.npz", x=images())
    return Case("error", culprit="model.onnx")


@case("file_npz_named_onnx")
def _(d: Path) -> Case:
    save_npz(d / "model.npz", x=images())
    os.replace(d / "model.npz", d / "model.onnx")
    save_npz(d / "calib.npz", x=images())
    return Case("error", culprit="model.onnx")


@case("file_is_a_folder")
def _(d: Path) -> Case:
    (d / "model.onnx").mkdir()
    save_npz(d / "calib.npz", x=images())
    return Case("error", culprit="model.onnx")


@case("file_missing")
def _(d: Path) -> Case:
    save_npz(d / "calib.npz", x=images())
    return Case("error", culprit="model.onnx")


@case("validate_not_onnx")
def _(d: Path) -> Case:
    (d / "model.onnx").write_bytes(b"\x08\x07garbage")
    return Case("error", argv=("validate", "model.onnx", "--target", "ort-cpu"), culprit="model.onnx")


@case("verify_truncated")
def _(d: Path) -> Case:
    data = cnn().SerializeToString()
    save(cnn(), d / "float.onnx")
    (d / "model.onnx").write_bytes(data[:100])
    save_npz(d / "calib.npz", x=images())
    return Case("error", argv=("verify", "float.onnx", "model.onnx", "--data", "calib.npz"), culprit="model.onnx")


@case("pack_empty")
def _(d: Path) -> Case:
    (d / "model.onnx").write_bytes(b"")
    return Case("error", argv=("pack", "model.onnx", "-o", "model.qcz"), culprit="model.onnx")


# --------------------------------------------------------------------------------------------
# broken graphs
# --------------------------------------------------------------------------------------------


def _broken(d: Path, nodes, inits, culprit: str, inputs=None) -> Case:
    proto = model_proto(nodes, inputs or [vi("x", [None, 3, 8, 8])], [vi("y", [None, 8, 8, 8])], inits)
    plain(d, proto)
    return Case("error", culprit=culprit)


@case("graph_cycle")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first"),
        helper.make_node("Conv", ["a", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["b"], name="loop_back"),
        helper.make_node("Identity", ["c"], ["y"], name="out"),
    ]
    return _broken(d, nodes, {"w": weight(8, 3, 3, 3)}, "model.onnx")


@case("graph_undefined_input")
def _(d: Path) -> Case:
    nodes = [helper.make_node("Conv", ["x", "w", "nowhere"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _broken(d, nodes, {"w": weight(8, 3, 3, 3)}, "nowhere")


@case("graph_missing_initializer")
def _(d: Path) -> Case:
    nodes = [helper.make_node("Conv", ["x", "w_missing"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _broken(d, nodes, {}, "w_missing")


@case("graph_duplicate_output_names")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return _broken(d, nodes, {"w": weight(8, 3, 3, 3)}, "model.onnx")


@case("graph_unknown_op")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("FrobnicateRelu", ["c"], ["y"], name="frob"),
    ]
    return _broken(d, nodes, {"w": weight(8, 3, 3, 3)}, "model.onnx")


@case("graph_duplicate_node_names")
def _(d: Path) -> Case:
    # Node names need not be unique in ONNX; qc must cope (its reports name nodes).
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="same", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="same"),
        helper.make_node("Conv", ["r0", "w1"], ["y"], name="same", pads=[1, 1, 1, 1]),
    ]
    proto = model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 8, 8, 8])], {"w0": weight(8, 3, 3, 3), "b0": weight(8), "w1": weight(8, 8, 3, 3, scale=0.2)})
    plain(d, proto)
    # onnxruntime refuses such a model (the float one too): a clean line naming the name.
    return Case("error", culprit="same")


@case("graph_no_quantizable_layer")
def _(d: Path) -> Case:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    plain(d, model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 3, 4, 4])]))
    return Case("ok")


# --------------------------------------------------------------------------------------------
# opsets and shapes
# --------------------------------------------------------------------------------------------

for _opset in (7, 9, 10, 11, 13, 15, 17, 19, 21):

    @case(f"opset_{_opset}")
    def _(d: Path, opset: int = _opset) -> Case:
        plain(d, cnn(opset))
        return Case("ok")


@case("shape_fixed_batch_1")
def _(d: Path) -> Case:
    plain(d, cnn(batch=1))
    return Case("ok")


@case("shape_symbolic_batch")
def _(d: Path) -> Case:
    plain(d, cnn(batch="N"))
    return Case("ok")


@case("shape_dynamic_spatial")
def _(d: Path) -> Case:
    plain(d, cnn(batch="N", spatial=("H", "W")), {"x": images(16, (3, 12, 10))})
    return Case("ok")


@case("shape_huge_declared_input")
def _(d: Path) -> Case:
    plain(d, cnn(batch=1, spatial=(2**31, 2**31)))
    return Case("error", culprit="x")


@case("shape_huge_reshape")
def _(d: Path) -> Case:
    # A Reshape to a shape of 2^62 elements: onnxruntime refuses it at run time.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="huge_reshape"),
    ]
    proto = model_proto(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [None, None])], {"w": weight(8, 3, 3, 3), "shape": np.array([2**31, 2**31], np.int64)})
    plain(d, proto)
    return Case("error", culprit="huge_reshape")


@case("shape_zero_sized_tensor")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Concat", ["f", "empty"], ["y"], name="concat_empty", axis=1),
    ]
    proto = model_proto(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8])], {"w": weight(8, 3, 3, 3), "empty": np.zeros((1, 0), np.float32)})
    plain(d, proto)
    return Case("ok")


# --------------------------------------------------------------------------------------------
# convolutions and matrix products of every shape
# --------------------------------------------------------------------------------------------


def conv_model(d: Path, *, rank: int = 2, group: int = 1, cin: int = 4, transpose: bool = False, calib_n: int = 16, **attrs) -> Case:
    spatial = (8,) * rank
    cout = 8
    wshape = (cin, cout // group, *(3,) * rank) if transpose else (cout, cin // group, *(3,) * rank)
    op = "ConvTranspose" if transpose else "Conv"
    nodes = [
        helper.make_node(op, ["x", "w", "b"], ["c"], name="layer", group=group, **attrs),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="head", kernel_shape=[1] * rank),
    ]
    proto = model_proto(nodes, [vi("x", [None, cin, *spatial])], [vi("y", [None] * (rank + 2))], {"w": weight(*wshape), "b": weight(cout, scale=0.1), "w2": weight(3, cout, *(1,) * rank)})
    plain(d, proto, {"x": rng().normal(0, 1, (calib_n, cin, *spatial)).astype(np.float32)})
    return Case("ok")


@case("conv_depthwise")
def _(d: Path) -> Case:
    return conv_model(d, cin=8, group=8, pads=[1, 1, 1, 1])


@case("conv_grouped")
def _(d: Path) -> Case:
    return conv_model(d, group=2, pads=[1, 1, 1, 1])


@case("conv_1d")
def _(d: Path) -> Case:
    return conv_model(d, rank=1, pads=[1, 1])


@case("conv_3d")
def _(d: Path) -> Case:
    return conv_model(d, rank=3, pads=[1] * 6)


@case("conv_dilated")
def _(d: Path) -> Case:
    return conv_model(d, dilations=[2, 2], pads=[2, 2, 2, 2])


@case("conv_strided")
def _(d: Path) -> Case:
    return conv_model(d, strides=[2, 2], pads=[1, 1, 1, 1])


for _pad in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):

    @case(f"conv_dilated_auto_pad_{_pad.lower()}")
    def _(d: Path, pad: str = _pad) -> Case:
        built = conv_model(d, auto_pad=pad, dilations=[2, 2], strides=[1, 1])
        # onnxruntime cannot run dilated SAME_* padding (the float model neither): a clean line.
        return Case("error", culprit="layer") if pad.startswith("SAME") else built

    @case(f"conv_strided_auto_pad_{_pad.lower()}")
    def _(d: Path, pad: str = _pad) -> Case:
        return conv_model(d, auto_pad=pad, strides=[2, 2])

    @case(f"conv_transpose_auto_pad_{_pad.lower()}")
    def _(d: Path, pad: str = _pad) -> Case:
        return conv_model(d, transpose=True, auto_pad=pad, strides=[2, 2])


@case("conv_transpose")
def _(d: Path) -> Case:
    return conv_model(d, transpose=True, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])


@case("conv_transpose_grouped")
def _(d: Path) -> Case:
    return conv_model(d, transpose=True, group=2, strides=[2, 2], pads=[1, 1, 1, 1])


@case("conv_transpose_grouped_tensorrt")
def _(d: Path) -> Case:
    conv_model(d, transpose=True, group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    return Case("ok", argv=(*COMPILE, "--target", "tensorrt"), target="tensorrt")


@case("gemm_trans_a")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="to_columns", perm=[1, 0]),
        helper.make_node("Gemm", ["xt", "w", "b"], ["y"], name="gemm_ta", transA=1),
    ]
    plain(d, model_proto(nodes, [vi("x", [None, 6])], [vi("y", [None, 5])], {"w": weight(6, 5), "b": weight(5)}), {"x": images(16, (6,))})
    return Case("ok")


@case("gemm_no_bias_alpha_beta")
def _(d: Path) -> Case:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm_alpha", alpha=0.5, transB=1)]
    plain(d, model_proto(nodes, [vi("x", [None, 6])], [vi("y", [None, 5])], {"w": weight(5, 6)}), {"x": images(16, (6,))})
    return Case("ok")


@case("matmul_batched_weights")
def _(d: Path) -> Case:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="batched"), helper.make_node("Relu", ["m"], ["y"], name="relu")]
    plain(d, model_proto(nodes, [vi("x", [None, 2, 4, 8])], [vi("y", [None, 2, 4, 6])], {"w": weight(2, 8, 6)}), {"x": images(16, (2, 4, 8))})
    return Case("ok")


@case("matmul_two_activations")
def _(d: Path) -> Case:
    # The "weight" is a graph input fed at run time: an activation, quantized as one.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="act_matmul")]
    plain(d, model_proto(nodes, [vi("x", [None, 4, 8]), vi("w", [None, 8, 6])], [vi("y", [None, 4, 6])]), {"x": images(16, (4, 8)), "w": images(16, (8, 6))})
    return Case("ok")


# --------------------------------------------------------------------------------------------
# where the weights live
# --------------------------------------------------------------------------------------------


@case("weights_in_constant_nodes")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Constant", [], ["w"], name="w_const", value=numpy_helper.from_array(weight(8, 3, 3, 3))),
        helper.make_node("Constant", [], ["b"], name="b_const", value=numpy_helper.from_array(weight(8))),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    plain(d, model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 8, 8, 8])]))
    return Case("ok")


@case("weights_shared_by_two_nodes")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "w2"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv_c", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "c"], ["y"], name="add"),
    ]
    plain(d, model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 8, 8, 8])], {"w": weight(8, 3, 3, 3), "w2": weight(8, 8, 3, 3, scale=0.2)}))
    return Case("ok")


@case("weights_are_overridable_inputs")
def _(d: Path) -> Case:
    # IR >= 4: an initializer also listed as a graph input is a default the caller may replace.
    proto = cnn()
    proto.graph.input.append(vi("w0", [8, 3, 3, 3]))
    plain(d, proto)
    return Case("ok")


@case("weights_nan")
def _(d: Path) -> Case:
    proto = cnn()
    w = weight(8, 3, 3, 3)
    w[2, 1, 0, 0] = np.nan
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w0"))
    plain(d, proto)
    return Case("error", culprit="w0")


@case("weights_inf")
def _(d: Path) -> Case:
    proto = cnn()
    w = weight(5, 8)
    w[0, 0] = -np.inf
    proto.graph.initializer[4].CopyFrom(numpy_helper.from_array(w, "wf"))
    plain(d, proto)
    return Case("error", culprit="wf")


@case("gemm_bias_nan")
def _(d: Path) -> Case:
    proto = cnn()
    b = weight(5, scale=0.1)
    b[3] = np.nan
    proto.graph.initializer[5].CopyFrom(numpy_helper.from_array(b, "bf"))
    plain(d, proto)
    return Case("error", culprit="bf")


@case("weights_all_zero")
def _(d: Path) -> Case:
    proto = cnn()
    proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float32), "w1"))
    plain(d, proto)
    return Case("ok")


@case("weights_one_zero_channel")
def _(d: Path) -> Case:
    proto = cnn()
    w = weight(8, 3, 3, 3)
    w[3] = 0.0
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w0"))
    plain(d, proto)
    return Case("ok")


# --------------------------------------------------------------------------------------------
# element types, inputs and outputs
# --------------------------------------------------------------------------------------------


@case("dtype_float16_model")
def _(d: Path) -> Case:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    proto = model_proto(nodes, [vi("x", [None, 3, 8, 8], TensorProto.FLOAT16)], [vi("y", [None, 8, 8, 8], TensorProto.FLOAT16)], {"w": weight(8, 3, 3, 3).astype(np.float16)})
    plain(d, proto, {"x": images().astype(np.float16)})
    return Case("ok")


@case("dtype_bfloat16_model")
def _(d: Path) -> Case:
    # onnxruntime's CPU kernels for bfloat16 are few: the float model itself cannot run.
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [8, 6], vals=weight(8, 6).ravel().tolist())
    nodes = [helper.make_node("Cast", ["x"], ["xb"], name="to_bf16", to=TensorProto.BFLOAT16), helper.make_node("MatMul", ["xb", "w"], ["yb"], name="matmul_bf16"), helper.make_node("Cast", ["yb"], ["y"], name="to_float", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "corpus", [vi("x", [None, 8])], [vi("y", [None, 6])], initializer=[w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    plain(d, proto, {"x": images(16, (8,))})
    return Case("error", culprit="matmul_bf16")


def token_model(d: Path, *, vocab: int = 50, calib_ids: np.ndarray | None = None) -> None:
    """A BERT-like toy: int64 token ids, an embedding Gather, attention, LayerNormalization, GELU-free MLP."""
    dm, seq = 16, 6
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("Add", ["e", "pos"], ["h"], name="add_pos"),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale_scores"),
        helper.make_node("Softmax", ["ss"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="context"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "h"], ["res"], name="residual"),
        helper.make_node("LayerNormalization", ["res", "ln_g", "ln_b"], ["n"], name="layer_norm", axis=-1),
        helper.make_node("ReduceMean", ["n", "axes"], ["pooled"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["pooled", "wc", "bc"], ["logits"], name="classifier", transB=1),
    ]
    inits = {
        "emb": weight(vocab, dm, scale=1.0), "pos": weight(seq, dm, scale=0.3),
        "wq": weight(dm, dm, scale=0.25), "wk": weight(dm, dm, scale=0.25), "wv": weight(dm, dm, scale=0.25), "wo": weight(dm, dm, scale=0.25),
        "scale": np.array(0.25, np.float32), "ln_g": np.ones(dm, np.float32), "ln_b": np.zeros(dm, np.float32),
        "axes": np.array([1], np.int64), "wc": weight(4, dm), "bc": weight(4, scale=0.1),
    }
    save(model_proto(nodes, [vi("ids", [None, seq], TensorProto.INT64)], [vi("logits", [None, 4])], inits, opset=18), d / "model.onnx")
    ids = calib_ids if calib_ids is not None else rng().integers(0, vocab, (32, seq), dtype=np.int64)
    save_npz(d / "calib.npz", ids=ids)


for _target in ("ort-cpu", "tensorrt", "qnn"):

    @case(f"tokens_bert_like_{_target.replace('-', '_')}")
    def _(d: Path, target: str = _target) -> Case:
        token_model(d)
        return Case("ok", argv=(*COMPILE, "--target", target), target=target)


@case("tokens_out_of_range")
def _(d: Path) -> Case:
    ids = rng().integers(0, 50, (32, 6), dtype=np.int64)
    ids[3, 2] = 75
    token_model(d, calib_ids=ids)
    return Case("error", culprit="embed")


@case("io_multiple_inputs_outputs")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("Conv", ["a", "wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Gemm", ["b", "wb", "bb"], ["gb"], name="fc_b", transB=1),
        helper.make_node("Relu", ["ca"], ["ya"], name="relu_a"),
        helper.make_node("Sigmoid", ["gb"], ["yb"], name="sigmoid_b"),
    ]
    proto = model_proto(nodes, [vi("a", [None, 3, 8, 8]), vi("b", [None, 10])], [vi("ya", [None, 8, 8, 8]), vi("yb", [None, 4])], {"wa": weight(8, 3, 3, 3), "wb": weight(4, 10), "bb": weight(4)})
    plain(d, proto, {"a": images(), "b": images(16, (10,))})
    return Case("ok")


@case("io_output_is_intermediate")
def _(d: Path) -> Case:
    proto = cnn()
    proto.graph.output.append(vi("r0", [None, 8, 8, 8]))
    plain(d, proto)
    return Case("ok")


@case("io_input_is_output")
def _(d: Path) -> Case:
    proto = cnn()
    proto.graph.output.append(vi("x", [None, 3, 8, 8]))
    plain(d, proto)
    return Case("ok")


# --------------------------------------------------------------------------------------------
# networks that are not plain feed-forward: recurrences, control flow, already quantized
# --------------------------------------------------------------------------------------------


def recurrent(d: Path, op: str) -> Case:
    hidden, feat, seq = 6, 5, 4
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    nodes = [helper.make_node(op, ["x", "W", "R", "B"], ["y_all", "y_h"], name=op.lower(), hidden_size=hidden)]
    inits = {"W": weight(1, gates * hidden, feat), "R": weight(1, gates * hidden, hidden), "B": weight(1, 2 * gates * hidden, scale=0.1)}
    proto = model_proto(nodes, [vi("x", [seq, None, feat])], [vi("y_h", [1, None, hidden])], inits, opset=14)
    plain(d, proto, {"x": rng().normal(0, 1, (16, 4, feat)).astype(np.float32)})
    return Case("ok")


@case("only_lstm")
def _(d: Path) -> Case:
    return recurrent(d, "LSTM")


@case("only_gru")
def _(d: Path) -> Case:
    return recurrent(d, "GRU")


@case("only_rnn")
def _(d: Path) -> Case:
    return recurrent(d, "RNN")


@case("only_topk")
def _(d: Path) -> Case:
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", axis=-1)]
    proto = model_proto(nodes, [vi("x", [None, 10])], [vi("values", [None, 3]), vi("indices", [None, 3], TensorProto.INT64)], {"k": np.array([3], np.int64)})
    plain(d, proto, {"x": images(16, (10,))})
    return Case("ok")


def _branch(name: str, w: np.ndarray) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1, 1, 1])],
        name,
        [],
        [vi(f"{name}_y", [None, 8, 8, 8])],
        initializer=[numpy_helper.from_array(w, f"{name}_w")],
    )


@case("control_if_with_conv")
def _(d: Path) -> Case:
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["branch_y"], name="choose", then_branch=_branch("then", weight(8, 3, 3, 3)), else_branch=_branch("else", weight(8, 3, 3, 3, scale=0.2))),
        helper.make_node("Conv", ["branch_y", "w_after"], ["y"], name="after", pads=[1, 1, 1, 1]),
    ]
    proto = model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 4, 8, 8])], {"zero": np.array(0.0, np.float32), "w_after": weight(4, 8, 3, 3, scale=0.2)})
    plain(d, proto, {"x": images(96)})
    return Case("ok", argv=COMPILE_ALL)


@case("control_loop_with_matmul")
def _(d: Path) -> Case:
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "loop_w"], ["m"], name="body_matmul"),
            helper.make_node("Tanh", ["m"], ["h_out"], name="body_tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [vi("iter", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("h_in", [None, 8])],
        [vi("cond_out", [], TensorProto.BOOL), vi("h_out", [None, 8])],
        initializer=[numpy_helper.from_array(weight(8, 8), "loop_w")],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="proj_in"),
        helper.make_node("Loop", ["trips", "true", "h0"], ["h"], name="loop", body=body),
        helper.make_node("MatMul", ["h", "w_out"], ["y"], name="proj_out"),
    ]
    inits = {"w_in": weight(6, 8), "trips": np.array(3, np.int64), "true": np.array(True), "w_out": weight(8, 4)}
    plain(d, model_proto(nodes, [vi("x", [None, 6])], [vi("y", [None, 4])], inits, opset=17), {"x": images(96, (6,))})
    return Case("ok", argv=COMPILE_ALL)


@case("control_scan_with_matmul")
def _(d: Path) -> Case:
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "scan_w"], ["m"], name="body_matmul"),
            helper.make_node("Add", ["m", "s_in"], ["s_out"], name="body_acc"),
            helper.make_node("Identity", ["s_out"], ["y_t"], name="body_out"),
        ],
        "body",
        [vi("s_in", [None, 4]), vi("x_t", [None, 6])],
        [vi("s_out", [None, 4]), vi("y_t", [None, 4])],
        initializer=[numpy_helper.from_array(weight(6, 4), "scan_w")],
    )
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="time_major", perm=[1, 0, 2]),
        helper.make_node("MatMul", ["s0_src", "w_s0"], ["s0"], name="init_state"),
        helper.make_node("Scan", ["s0", "xt"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1),
        helper.make_node("MatMul", ["s", "w_out"], ["y"], name="proj_out"),
    ]
    proto = model_proto(nodes, [vi("x", [None, 5, 6]), vi("s0_src", [None, 3])], [vi("y", [None, 2])], {"w_s0": weight(3, 4), "w_out": weight(4, 2)}, opset=17)
    plain(d, proto, {"x": images(96, (5, 6)), "s0_src": images(96, (3,))})
    return Case("ok", argv=COMPILE_ALL)


@case("prequantized_qdq")
def _(d: Path) -> Case:
    w = weight(8, 3, 3, 3)
    scale = np.float32(np.abs(w).max() / 127)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    inits = {"xs": np.float32(0.05), "xz": np.uint8(128), "wq": np.round(w / scale).astype(np.int8), "ws": scale, "wz": np.int8(0)}
    plain(d, model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 8, 8, 8])], inits))
    return Case("error", culprit="already quantized")


@case("prequantized_qlinearconv")
def _(d: Path) -> Case:
    w = weight(8, 3, 3, 3)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["yq"], name="qconv", pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dq_y"),
    ]
    inits = {"xs": np.float32(0.05), "xz": np.uint8(128), "wq": np.round(w / 0.01).clip(-127, 127).astype(np.int8), "ws": np.float32(0.01), "wz": np.int8(0), "ys": np.float32(0.05), "yz": np.uint8(128)}
    plain(d, model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 8, 8, 8])], inits))
    return Case("error", culprit="already quantized")


@case("prequantized_convinteger")
def _(d: Path) -> Case:
    w = weight(8, 3, 3, 3)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq_x"),
        helper.make_node("ConvInteger", ["xq", "wq", "xz", "wz"], ["acc"], name="conv_int", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["acc"], ["accf"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"], name="scales"),
        helper.make_node("Mul", ["accf", "s"], ["y"], name="rescale"),
    ]
    # ConvInteger takes uint8 weights on every onnxruntime build: codes shifted by 128.
    codes = np.round(w / 0.01).clip(-127, 127).astype(np.int16) + 128
    inits = {"wq": codes.astype(np.uint8), "wz": np.uint8(128), "ws": np.float32(0.01)}
    plain(d, model_proto(nodes, [vi("x", [None, 3, 8, 8])], [vi("y", [None, 8, 8, 8])], inits))
    return Case("error", culprit="already quantized")


@case("prequantized_matmulinteger")
def _(d: Path) -> Case:
    w = weight(8, 6)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq_x"),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz"], ["acc"], name="matmul_int"),
        helper.make_node("Cast", ["acc"], ["accf"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"], name="scales"),
        helper.make_node("Mul", ["accf", "s"], ["y"], name="rescale"),
    ]
    inits = {"wq": np.round(w / 0.01).clip(-127, 127).astype(np.int8), "ws": np.float32(0.01)}
    plain(d, model_proto(nodes, [vi("x", [None, 8])], [vi("y", [None, 6])], inits), {"x": images(16, (8,))})
    return Case("error", culprit="already quantized")


@case("pitch_cnn_1d_bn_after_relu_sigmoid")
def _(d: Path) -> Case:
    """A CREPE-like pitch estimator: 1-D convolutions, BatchNormalization after ReLU, a Sigmoid output."""
    r = rng()
    nodes, inits, x = [], {}, "x"
    channels = [1, 16, 16, 16]
    for i in range(3):
        cin, cout = channels[i], channels[i + 1]
        inits |= {f"w{i}": r.normal(0, 1 / np.sqrt(cin * 9), (cout, cin, 9)).astype(np.float32), f"g{i}": r.uniform(0.5, 2, cout).astype(np.float32), f"be{i}": r.normal(0, 0.2, cout).astype(np.float32), f"m{i}": r.uniform(0, 1, cout).astype(np.float32), f"v{i}": r.uniform(0.2, 2, cout).astype(np.float32)}
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[4, 4], strides=[2]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("BatchNormalization", [f"r{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"),
        ]
        x = f"n{i}"
    inits |= {"wf": r.normal(0, 0.05, (60, 16 * 32)).astype(np.float32), "bf": np.full(60, -2.0, np.float32)}
    nodes += [helper.make_node("Flatten", [x], ["f"], name="flatten"), helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1), helper.make_node("Sigmoid", ["logits"], ["y"], name="sigmoid")]
    frames = np.sin(np.linspace(0, 60, 256, dtype=np.float32)[None, None, :] * r.uniform(0.5, 4, (32, 1, 1)).astype(np.float32))
    plain(d, model_proto(nodes, [vi("x", [None, 1, 256])], [vi("y", [None, 60])], inits), {"x": frames.astype(np.float32)})
    return Case("ok")


# --------------------------------------------------------------------------------------------
# external data
# --------------------------------------------------------------------------------------------


def external(d: Path, location: str, *, offset: int = 0, length: int | None = None, write_to: Path | None = None) -> None:
    """The CNN with w1 stored outside the model file at ``location`` (relative to the model)."""
    proto = cnn()
    tensor = next(t for t in proto.graph.initializer if t.name == "w1")
    raw = tensor.raw_data if tensor.raw_data else numpy_helper.to_array(tensor).tobytes()
    target = write_to if write_to is not None else (d / location)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\0" * offset + raw)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(len(raw) if length is None else length)}
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    (d / "model").mkdir(exist_ok=True)
    save(proto, d / "model.onnx")
    save_npz(d / "calib.npz", x=images())


@case("external_inside_folder")
def _(d: Path) -> Case:
    external(d, "weights.bin", offset=64)
    return Case("ok")


@case("external_in_a_subfolder")
def _(d: Path) -> Case:
    external(d, "data/weights.bin")
    return Case("ok")


@case("external_outside_folder")
def _(d: Path) -> Case:
    external(d, "../outside_weights.bin", write_to=d.parent / f"{d.name}_outside_weights.bin")
    # The location names a file that exists outside the folder: it must not be read.
    proto = onnx.load(d / "model.onnx", load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = f"../{d.name}_outside_weights.bin"
    save(proto, d / "model.onnx")
    return Case("error", culprit="outside_weights.bin")


@case("external_absolute_path")
def _(d: Path) -> Case:
    absolute = d.parent / f"{d.name}_absolute.bin"
    external(d, str(absolute), write_to=absolute)
    return Case("error", culprit="w1")


@case("external_through_symlink")
def _(d: Path) -> Case:
    outside = d.parent / f"{d.name}_linked.bin"
    external(d, "weights.bin", write_to=outside)
    (d / "weights.bin").symlink_to(outside)
    return Case("error", culprit="weights.bin")


@case("external_bad_offset")
def _(d: Path) -> Case:
    external(d, "weights.bin")
    proto = onnx.load(d / "model.onnx", load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "offset":
                entry.value = str(10**9)
    save(proto, d / "model.onnx")
    return Case("error", culprit="weights.bin")


@case("external_bad_length")
def _(d: Path) -> Case:
    external(d, "weights.bin", length=10**7)
    return Case("error", culprit="weights.bin")


@case("external_missing_file")
def _(d: Path) -> Case:
    external(d, "weights.bin")
    (d / "weights.bin").unlink()
    return Case("error", culprit="weights.bin")


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------


@case("path_with_spaces")
def _(d: Path) -> Case:
    save(cnn(), d / "my models" / "float model.onnx")
    save_npz(d / "calib data.npz", x=images())
    return Case("ok", argv=("compile", "my models/float model.onnx", "--calib", "calib data.npz", "-o", "out dir", "--latency-runs", "0", "--calib-count", "16"), output="out dir", calib="calib data.npz")


@case("path_non_ascii")
def _(d: Path) -> Case:
    save(cnn(), d / "modèles" / "模型.onnx")
    save_npz(d / "données.npz", x=images())
    return Case("ok", argv=("compile", "modèles/模型.onnx", "--calib", "données.npz", "-o", "sortie", "--latency-runs", "0", "--calib-count", "16"), output="sortie", calib="données.npz")


# --------------------------------------------------------------------------------------------
# calibration files
# --------------------------------------------------------------------------------------------


def calib_case(d: Path, culprit: str = "calib.npz", **arrays) -> Case:
    save(cnn(), d / "model.onnx")
    save_npz(d / "calib.npz", **arrays)
    return Case("error", culprit=culprit)


@case("calib_wrong_dtype_complex")
def _(d: Path) -> Case:
    return calib_case(d, x=images().astype(np.complex64))


@case("calib_wrong_dtype_strings")
def _(d: Path) -> Case:
    return calib_case(d, x=np.array(["a", "b"] * 8))


@case("calib_float64_for_float32")
def _(d: Path) -> Case:
    return calib_case(d, culprit="'x'", x=images().astype(np.float64))


@case("calib_wrong_shape")
def _(d: Path) -> Case:
    return calib_case(d, x=images(16, (3, 9, 8)))


@case("calib_wrong_rank")
def _(d: Path) -> Case:
    return calib_case(d, x=images(16, (3, 8)))


@case("calib_wrong_names")
def _(d: Path) -> Case:
    return calib_case(d, culprit="'x'", image=images(), mask=images())


@case("calib_single_array_any_name")
def _(d: Path) -> Case:
    # One input, one array: the array is that input's, whatever its name.
    plain(d, calib={"image": images()})
    return Case("ok", calib="calib.npz")


@case("calib_zero_samples")
def _(d: Path) -> Case:
    return calib_case(d, x=images(0))


@case("calib_nan")
def _(d: Path) -> Case:
    x = images()
    x[5, 1, 2, 3] = np.nan
    return calib_case(d, x=x)


@case("calib_inf")
def _(d: Path) -> Case:
    x = images()
    x[0, 0, 0, 0] = np.inf
    return calib_case(d, x=x)


@case("calib_object_array")
def _(d: Path) -> Case:
    return calib_case(d, x=np.array([images(1)[0], "not a tensor"], dtype=object))


@case("calib_huge_declared_shape")
def _(d: Path) -> Case:
    # A .npy header declaring 10^12 samples over 64 bytes of data: nothing may be allocated from it.
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 8, 8), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    save(cnn(), d / "model.onnx")
    with zipfile.ZipFile(d / "calib.npz", "w") as archive:
        archive.writestr("x.npy", npy)
    return Case("error", culprit="calib.npz")


@case("calib_not_a_zip")
def _(d: Path) -> Case:
    save(cnn(), d / "model.onnx")
    (d / "calib.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return Case("error", culprit="calib.npz")


@case("calib_plain_npy")
def _(d: Path) -> Case:
    save(cnn(), d / "model.onnx")
    np.save(d / "calib.npy", images())
    os.replace(d / "calib.npy", d / "calib.npz")
    return Case("error", culprit="calib.npz")


@case("calib_missing_file")
def _(d: Path) -> Case:
    save(cnn(), d / "model.onnx")
    return Case("error", culprit="calib.npz")


@case("calib_extra_arrays_ignored")
def _(d: Path) -> Case:
    plain(d, calib={"x": images(), "labels": np.arange(16), "notes": np.zeros(3)})
    return Case("ok")


@case("calib_int_for_float_input")
def _(d: Path) -> Case:
    # Raw uint8 pixels for a float input: converting would hide a missing normalisation.
    return calib_case(d, culprit="'x'", x=rng().integers(0, 255, (16, 3, 8, 8)).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# output folders
# --------------------------------------------------------------------------------------------


@case("output_exists_not_empty")
def _(d: Path) -> Case:
    plain(d)
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("a user's file\n")
    return Case("error", culprit="out")


@case("output_exists_empty")
def _(d: Path) -> Case:
    plain(d)
    (d / "out").mkdir()
    return Case("ok")


@case("output_is_the_input_folder")
def _(d: Path) -> Case:
    plain(d)
    return Case("error", argv=("compile", "model.onnx", "--calib", "calib.npz", "-o", ".", "--force", "--latency-runs", "0"), culprit="-o")


@case("output_is_a_file")
def _(d: Path) -> Case:
    plain(d)
    (d / "out").write_text("not a folder\n")
    return Case("error", culprit="out")


@case("output_inside_a_file")
def _(d: Path) -> Case:
    plain(d)
    (d / "blocker").write_text("not a folder\n")
    return Case("error", argv=("compile", "model.onnx", "--calib", "calib.npz", "-o", "blocker/out", "--latency-runs", "0"), culprit="blocker")


# --------------------------------------------------------------------------------------------
# pipelines and target files
# --------------------------------------------------------------------------------------------


def pipeline_case(d: Path, pipeline: str, culprit: str) -> Case:
    plain(d)
    return Case("error", argv=(*COMPILE, "--pipeline", pipeline), culprit=culprit)


@case("pipeline_unknown_pass")
def _(d: Path) -> Case:
    return pipeline_case(d, "fold-batchnorm,quantize-everything", "quantize-everything")


@case("pipeline_unknown_option")
def _(d: Path) -> Case:
    return pipeline_case(d, "calibrate{methd=mse},insert-qdq", "methd")


@case("pipeline_bad_option_value")
def _(d: Path) -> Case:
    return pipeline_case(d, "calibrate{method=median},insert-qdq", "median")


@case("pipeline_unbalanced_braces")
def _(d: Path) -> Case:
    return pipeline_case(d, "calibrate{method=mse,insert-qdq", "--pipeline")


@case("pipeline_empty")
def _(d: Path) -> Case:
    return pipeline_case(d, " , ", "--pipeline")


@case("target_unknown_name")
def _(d: Path) -> Case:
    plain(d)
    return Case("error", argv=(*COMPILE, "--target", "tpu-v9"), culprit="tpu-v9")


@case("target_file_malformed_toml")
def _(d: Path) -> Case:
    plain(d)
    (d / "mine.toml").write_text('name = "mine"\n[activations\nbits = 8\n')
    return Case("error", argv=(*COMPILE, "--target", "mine.toml"), culprit="mine.toml")


@case("target_file_unknown_key")
def _(d: Path) -> Case:
    plain(d)
    (d / "mine.toml").write_text('name = "mine"\nextends = "ort-cpu"\nfrobnicate = true\n')
    return Case("error", argv=(*COMPILE, "--target", "mine.toml"), culprit="frobnicate")


@case("target_file_missing")
def _(d: Path) -> Case:
    plain(d)
    return Case("error", argv=(*COMPILE, "--target", "missing.toml"), culprit="missing.toml")


@case("target_file_binary")
def _(d: Path) -> Case:
    plain(d)
    (d / "mine.toml").write_bytes(rng().integers(0, 256, 256, dtype=np.uint8).tobytes())
    return Case("error", argv=(*COMPILE, "--target", "mine.toml"), culprit="mine.toml")


def build(root: Path, names: list[str] | None = None) -> dict[str, Case]:
    """Write every case (or those named) under ``root/<name>/``; return what each expects."""
    built = {}
    for name in names or list(CASES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=False)
        built[name] = CASES[name](folder)
    return built


__all__ = ["CASES", "COMPILE", "Case", "build"]
