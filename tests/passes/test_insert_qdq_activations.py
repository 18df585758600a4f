"""insert-qdq and activations other than Relu/Clip: what ort-cpu quantizes (Sigmoid, LeakyRelu, as
onnxruntime has integer kernels for them), what it keeps float and the reason the report gives,
Gelu's Erf form kept float as one activation, and the output accuracy onnxruntime gets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from qcompiler.data import DataSource
from qcompiler.ir import to_proto
from qcompiler.op_roles import decomposed_activations
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import parse_pipeline
from qcompiler.quant.uniform import sqnr_db
from qcompiler.runtime import make_session, session_options
from qcompiler.targets.spec import load_target
from tests.helpers import make_model, tensor_info


def _act(kind: str, x: str, out: str, s: str = "") -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """``out = kind(x)``; ``s`` suffixes the names of its nodes and inner tensors."""
    if kind == "SiLU":
        return [helper.make_node("Sigmoid", [x], [f"sig{s}"], name=f"sigmoid{s}"), helper.make_node("Mul", [x, f"sig{s}"], [out], name=f"silu_mul{s}")], {}
    if kind == "GeluErf":  # torch's export of nn.GELU before opset 20
        nodes = [
            helper.make_node("Div", [x, "sqrt2"], [f"d{s}"], name=f"gelu_div{s}"),
            helper.make_node("Erf", [f"d{s}"], [f"e{s}"], name=f"gelu_erf{s}"),
            helper.make_node("Add", [f"e{s}", "one"], [f"a{s}"], name=f"gelu_add{s}"),
            helper.make_node("Mul", [x, f"a{s}"], [f"m{s}"], name=f"gelu_mul{s}"),
            helper.make_node("Mul", [f"m{s}", "half"], [out], name=f"gelu_half{s}"),
        ]
        return nodes, {"sqrt2": np.float32(math.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}
    attrs = {"LeakyRelu": {"alpha": 0.1}, "HardSigmoid": {"alpha": 1 / 6, "beta": 0.5}}.get(kind, {})
    return [helper.make_node(kind, [x], [out], name=f"act{s}", **attrs)], {}


def _net(kind: str) -> ir.Model:
    """Conv -> act -> Conv -> act -> Conv: each activation between two integer layers, inputs of
    unit scale (Kaiming weights on unit-normal data)."""
    rng = np.random.default_rng(11)
    inits = {"w0": rng.normal(0, math.sqrt(2 / 27), (8, 3, 3, 3)).astype(np.float32), "b0": rng.normal(0, 0.3, 8).astype(np.float32),
             "w1": rng.normal(0, math.sqrt(2 / 72), (8, 8, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.3, 8).astype(np.float32),
             "w2": rng.normal(0, math.sqrt(1 / 8), (4, 8, 1, 1)).astype(np.float32)}
    first, more = _act(kind, "c0", "a0")
    second, _ = _act(kind, "c1", "a1", "_2")
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", pads=[1] * 4), *first,
             helper.make_node("Conv", ["a0", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4), *second]
    nodes.append(helper.make_node("Conv", ["a1", "w2"], ["out"], name="conv2"))
    return make_model(nodes, [tensor_info("input", [None, 3, 8, 8])], [tensor_info("out", [None, 4, 8, 8])], {**inits, **more}, opset=20 if kind == "Gelu" else 17)


def _compile(model: ir.Model, target: str = "ort-cpu") -> tuple[ir.Model, PassContext]:
    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    spec = load_target(target)
    ctx = PassContext(target=spec, data=DataSource({"input": x}))
    result = parse_pipeline(spec.pipeline).run(model, ctx)
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    return result.model, ctx


def _ran(model: ir.Model, tmp_path: Path) -> list[str]:
    """Op types of the graph onnxruntime (ORT_ENABLE_ALL) actually executes."""
    import onnxruntime as ort

    options = session_options(optimize=True)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(to_proto(model).SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


KINDS = ["Sigmoid", "HardSigmoid", "HardSwish", "SiLU", "LeakyRelu", "Tanh", "Gelu", "GeluErf", "Softplus", "Elu"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_activation_compiles_to_a_model_onnxruntime_runs_accurately(kind: str) -> None:
    model, _ = _compile(_net(kind))
    held_out = {"input": np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    (ref,) = make_session(to_proto(_net(kind))).run(None, held_out)
    (got,) = make_session(to_proto(model)).run(None, held_out)  # ORT_ENABLE_ALL: its integer kernels
    # 32 to 51 dB on an AVX512-VNNI machine; CPUs whose kernels add products in int16 pairs get
    # narrower weights and lose a few dB: 25 is the bar (the accuracy guard's default is 20).
    assert sqnr_db(ref, got) > 25


@pytest.mark.parametrize(("kind", "kernel"), [("Sigmoid", "QLinearSigmoid"), ("LeakyRelu", "QLinearLeakyRelu")])
def test_sigmoid_and_leakyrelu_are_quantized_with_their_own_output_range(kind: str, kernel: str, tmp_path: Path) -> None:
    model, ctx = _compile(_net(kind))
    assert not [d for d in ctx.diagnostics if d.level == "float"]
    for act in (n for n in model.graph if n.op_type == kind):
        dq, (q,) = act.inputs[0].producer(), act.outputs[0].consumers()
        assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear"
        in_scale, out_scale = float(dq.inputs[1].const_value.numpy()), float(q.inputs[1].const_value.numpy())
        # Calibrated on the activation's output, not the Conv's: Sigmoid's lies inside [0, 1].
        assert out_scale != in_scale
        if kind == "Sigmoid":
            assert out_scale * 255 <= 1.0 + 1e-6
    assert _ran(model, tmp_path).count(kernel) == 2


@pytest.mark.parametrize("kind", ["HardSigmoid", "HardSwish", "Tanh", "Gelu", "Softplus", "Elu"])
def test_activations_without_an_integer_kernel_stay_float_with_the_measured_reason(kind: str) -> None:
    model, ctx = _compile(_net(kind))
    kept = [d for d in ctx.diagnostics if d.level == "float"]
    assert [d.op_type for d in kept] == [kind, kind]
    reason = load_target("ort-cpu").ops.float_reason(kind)
    assert all(d.message == f"{kind} kept float by target 'ort-cpu': {reason}" for d in kept)
    for act in (n for n in model.graph if n.op_type == kind):  # float, between the layers' quantizers
        assert act.inputs[0].producer().op_type == "DequantizeLinear"
        assert [c.op_type for c in act.outputs[0].consumers()] == ["QuantizeLinear"]


def test_a_target_extending_ort_cpu_can_quantize_what_it_keeps_float(tmp_path: Path) -> None:
    target = tmp_path / "t.toml"
    quantized = list(load_target("ort-cpu").ops.quantized) + ["Tanh"]
    target.write_text(f'extends = "ort-cpu"\nname = "t"\n[ops]\nquantized = {quantized!r}\n'.replace("'", '"'))
    _, ctx = _compile(_net("Tanh"), str(target))
    assert not [d for d in ctx.diagnostics if d.level == "float"]


def test_gelu_erf_form_stays_float_as_one_activation() -> None:
    model, ctx = _compile(_net("GeluErf"))
    kept = [d for d in ctx.diagnostics if d.level == "float"]
    # Both Gelus, all five nodes each: the Mul and Add inside are not quantized one by one.
    assert sorted(d.node for d in kept) == sorted(f"gelu_{n}{s}" for n in ("div", "erf", "add", "mul", "half") for s in ("", "_2"))
    assert all(d.message.startswith("Gelu (") and "kept float by target 'ort-cpu'" in d.message for d in kept)
    for half in (n for n in model.graph if n.name.startswith("gelu_half")):
        assert [c.op_type for c in half.outputs[0].consumers()] == ["QuantizeLinear"]
    inner = [n for n in model.graph if n.name.startswith(("gelu_add", "gelu_mul"))]
    assert len(inner) == 4 and all(c.op_type != "QuantizeLinear" for n in inner for c in n.outputs[0].consumers())
    assert all(n.inputs[0].producer() is None or n.inputs[0].producer().op_type != "DequantizeLinear" for n in inner if n.name.startswith("gelu_add"))


def _gelu_graph(order: str, divisor: float = math.sqrt(2), extra_use: bool = False) -> ir.Model:
    if order == "torch":
        nodes, inits = _act("GeluErf", "x", "y")
        inits["sqrt2"] = np.float32(divisor)
    else:  # Hugging Face: (x * 0.5) * (1 + erf(x * (1 / sqrt 2)))
        nodes = [
            helper.make_node("Mul", ["x", "half"], ["h"], name="gelu_pre"),
            helper.make_node("Mul", ["inv_sqrt2", "x"], ["d"], name="gelu_div"),
            helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
            helper.make_node("Add", ["one", "e"], ["a"], name="gelu_add"),
            helper.make_node("Mul", ["h", "a"], ["y"], name="gelu_mul"),
        ]
        inits = {"half": np.float32(0.5), "inv_sqrt2": np.float32(1 / divisor), "one": np.float32(1)}
    outputs = [tensor_info("y", [1, 4])]
    if extra_use:  # the Erf's output is also used elsewhere: not a Gelu any more
        nodes.append(helper.make_node("Neg", ["e"], ["n"], name="neg"))
        outputs.append(tensor_info("n", [1, 4]))
    return make_model(nodes, [tensor_info("x", [1, 4])], outputs, inits)


@pytest.mark.parametrize("order", ["torch", "huggingface"])
def test_decomposed_gelu_is_found_in_both_export_orders_and_computes_gelu(order: str) -> None:
    model = _gelu_graph(order)
    found = decomposed_activations(model.graph)
    assert {name for name, _ in found.values()} == {"Gelu"}
    assert {n.name for n in model.graph} == {n.name for n in next(iter(found.values()))[1]}
    x = np.linspace(-3, 3, 4, dtype=np.float32).reshape(1, 4)
    from scipy.special import erf

    np.testing.assert_allclose(make_session(to_proto(model)).run(None, {"x": x})[0], x * 0.5 * (1 + erf(x / np.sqrt(2))), rtol=1e-5)


@pytest.mark.parametrize(("divisor", "extra_use"), [(2.0, False), (math.sqrt(2), True)])
def test_an_erf_that_is_not_a_gelu_is_not_matched(divisor: float, extra_use: bool) -> None:
    for order in ("torch", "huggingface"):
        assert decomposed_activations(_gelu_graph(order, divisor, extra_use).graph) == {}
