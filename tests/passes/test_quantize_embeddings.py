"""quantize-embeddings: integer tables gathered as integers, bit-exact against the shared weight
quantizer in onnxruntime; what stays float and why; the targets' own outputs validate clean; the
accuracy guard can put a lookup back in float."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qcompiler.accuracy_guard import FloatLookup, layer_in_float
from qcompiler.ir import copy_model, to_proto
from qcompiler.pass_manager import PassContext, PassManager
from qcompiler.passes.quantize_embeddings import QuantizeEmbeddings
from qcompiler.precision import FLOAT_LAYER_INPUTS_FACT
from qcompiler.quant.weights import dequantize_weight, quantize_weight
from qcompiler.targets.spec import EmbeddingRule, TensorRule, load_target, target_to_toml
from tests.helpers import make_model, run, tensor_info
from tests.test_cli_errors import assert_one_line_error, qc

RULES = {
    "int8 rows": EmbeddingRule(TensorRule("int8", True, "per-channel", narrow_range=True), "gather-cast-mul"),
    "uint8 rows, zero points": EmbeddingRule(TensorRule("uint8", False, "per-channel"), "gather-cast-mul"),
    "int8 per tensor": EmbeddingRule(TensorRule("int8", True, "per-tensor", narrow_range=True), "gather-cast-mul"),
    "int4 blocks": EmbeddingRule(TensorRule("int4", True, "per-block", narrow_range=True, block_size=32), "gather-block-quantized"),
    "uint4 blocks, zero points": EmbeddingRule(TensorRule("uint4", False, "per-block", block_size=16), "gather-block-quantized"),
}


def _lookup_model(vocab: int = 300, dim: int = 72, *, tied: bool = False, as_input: bool = False) -> tuple[ir.Model, np.ndarray]:
    """ids [b, 5] -> Gather(table) -> Relu (-> MatMul by the transposed table where tied)."""
    table = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup", axis=0), helper.make_node("Relu", ["emb"], ["y"], name="relu")]
    outputs = [tensor_info("y", ["b", 5, dim])]
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], name="t", perm=[1, 0]), helper.make_node("MatMul", ["y", "table_t"], ["logits"], name="head")]
        outputs = [tensor_info("logits", ["b", 5, vocab])]
    inputs = [tensor_info("ids", ["b", 5], TensorProto.INT64)] + ([tensor_info("table", [vocab, dim])] if as_input else [])
    return make_model(nodes, inputs, outputs, {"table": table}, opset=21), table


def _ctx(rule: EmbeddingRule | None, base: str = "ort-cpu-int4") -> PassContext:
    return PassContext(target=dataclasses.replace(load_target(base), embeddings=rule))


def _ids(vocab: int = 300) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, (4, 5))


@pytest.mark.parametrize("case", RULES)
def test_rows_gathered_as_integers_equal_the_quantizer_bit_for_bit(case: str) -> None:
    rule = RULES[case]
    model, table = _lookup_model()
    result = PassManager.run_one(QuantizeEmbeddings(), model, _ctx(rule))
    ops = [n.op_type for n in result.model.graph]
    assert "GatherBlockQuantized" in ops if rule.lowering == "gather-block-quantized" else ops[:2] == ["Gather", "Cast"]
    assert "table" not in result.model.graph.initializers  # the float table is gone
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    axis = {"per-block": 1, "per-channel": 0, "per-tensor": None}[rule.rule.granularity]
    codes, scale, zero_point = quantize_weight(table, rule.rule, rule.rule.bits, axis)
    expected = np.maximum(dequantize_weight(codes, scale, zero_point, rule.rule, axis)[_ids()], 0)
    got = run(result.model, {"ids": _ids()})[0]
    np.testing.assert_array_equal(got, expected)
    stats = result.stats
    assert stats["tables"] == 1 and stats["float_bytes"] == table.nbytes
    assert stats["stored_bytes"] < table.nbytes * (0.3 if rule.rule.bits == 8 else 0.25)
    sqnr = stats["per_table"][0]["weight_sqnr_db"]
    assert (sqnr > 38) if rule.rule.bits == 8 else (18 < sqnr < 30)


def test_graph_output_lookup_keeps_its_name() -> None:
    table = np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32)
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0)], [tensor_info("ids", [3], TensorProto.INT64)], [tensor_info("emb", [3, 32])], {"table": table}, opset=21)
    out = PassManager.run_one(QuantizeEmbeddings(), model, _ctx(RULES["int8 rows"])).model
    assert [v.name for v in out.graph.outputs] == ["emb"]
    np.testing.assert_allclose(run(out, {"ids": np.array([0, 5, 199])})[0], table[[0, 5, 199]], atol=np.abs(table).max() / 127)


@pytest.mark.parametrize(("case", "reason"), [
    ("tied", "Transpose 't' also reads it (tied weights"),
    ("graph input", "also a graph input"),
    ("small", "under the target's min_elements"),
    ("columns", "along axis 1"),
])
def test_tables_that_stay_float_say_why(case: str, reason: str) -> None:
    if case == "columns":
        table = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
        model = make_model([helper.make_node("Gather", ["table", "ids"], ["y"], name="cols", axis=1)], [tensor_info("ids", [3], TensorProto.INT64)], [tensor_info("y", [64, 3])], {"table": table}, opset=21)
    else:
        model, _ = _lookup_model(vocab=20 if case == "small" else 300, tied=case == "tied", as_input=case == "graph input")
    ctx = _ctx(dataclasses.replace(RULES["int8 rows"], min_elements=8192 if case == "small" else 4096))
    result = PassManager.run_one(QuantizeEmbeddings(), model, ctx)
    assert not result.modified and result.stats["tables"] == 0
    notes = " ".join(n.message for n in ctx.diagnostics if n.pass_name == "quantize-embeddings")
    assert ("stays float" in notes and reason in notes) if case != "small" else notes == ""  # tables under the limit are not worth a line


def test_a_target_without_embeddings_leaves_tables_float() -> None:
    model, _ = _lookup_model()
    ctx = _ctx(None)
    result = PassManager.run_one(QuantizeEmbeddings(), model, ctx)
    assert not result.modified and "table" in result.model.graph.initializers
    assert any("no [embeddings]" in n.message for n in ctx.diagnostics)


@pytest.mark.parametrize("case", ["int8 rows", "int4 blocks"])
def test_the_guard_puts_a_lookup_back_in_float(case: str) -> None:
    model, table = _lookup_model()
    ctx = _ctx(RULES[case])
    out = PassManager.run_one(QuantizeEmbeddings(), model, ctx).model
    (name, lookup), = ctx.facts[FLOAT_LAYER_INPUTS_FACT].items()
    assert isinstance(lookup, FloatLookup) and name in {n.name for n in out.graph}
    trial = copy_model(out)
    assert layer_in_float(trial, name, lookup)
    assert not any(n.op_type in ("Cast", "GatherBlockQuantized") for n in trial.graph)
    np.testing.assert_array_equal(run(trial, {"ids": _ids()})[0], np.maximum(table[_ids()], 0))


# --- as a user runs it ----------------------------------------------------------------------

def _bert_like(path: Path) -> None:
    """Token + position embeddings, a LayerNorm, two MatMul layers: a BERT-like toy."""
    rng = np.random.default_rng(0)
    vocab, dim = 400, 64
    inits = {"tok": rng.normal(0, 1, (vocab, dim)), "pos": rng.normal(0, 0.1, (8, dim)), "pos_ids": np.arange(8, dtype=np.int64),
             "ln_s": np.ones(dim), "ln_b": np.zeros(dim), "w1": rng.normal(0, 0.1, (dim, 128)), "w2": rng.normal(0, 0.1, (128, dim))}
    inits = {k: (v if v.dtype == np.int64 else v.astype(np.float32)) for k, v in inits.items()}
    nodes = [helper.make_node("Gather", ["tok", "ids"], ["t"], name="tok_lookup", axis=0), helper.make_node("Gather", ["pos", "pos_ids"], ["p"], name="pos_lookup", axis=0),
             helper.make_node("Add", ["t", "p"], ["e"]), helper.make_node("LayerNormalization", ["e", "ln_s", "ln_b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = make_model(nodes, [tensor_info("ids", ["b", 8], TensorProto.INT64)], [tensor_info("y", ["b", 8, dim])], inits, opset=17)
    onnx.save(to_proto(model), path)
    np.savez(path.parent / "calib.npz", ids=rng.integers(0, vocab, (64, 8)))
    np.savez(path.parent / "test.npz", ids=rng.integers(0, vocab, (64, 8)))


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cpu-int4"])
def test_compile_stores_the_token_table_as_int8_and_validates_clean(tmp_path: Path, target: str) -> None:
    _bert_like(tmp_path / "bert.onnx")
    done = qc("compile", "bert.onnx", "--target", target, "--calib", "calib.npz", "--data", "test.npz", "-o", "out", "--latency-runs", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = ir.load(str(tmp_path / "out" / "model.onnx"))
    lookups = [n for n in out.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None and n.inputs[0].const_value.dtype == ir.DataType.INT8]
    assert len(lookups) == 1 and list(lookups[0].inputs[0].shape) == [400, 64]
    assert "tok" not in out.graph.initializers
    checked = qc("validate", "out/model.onnx", "--target", target, cwd=tmp_path)
    assert checked.returncode == 0 and "clean" in checked.stdout, checked.stdout
    assert "quantize-embeddings" in done.stdout and "tables=1" in done.stdout.replace("\n", " ").replace("│", " ").replace("  ", " ")


@pytest.mark.parametrize(("body", "where"), [
    ('dtype = "int4"\nsymmetric = true\ngranularity = "per-channel"\nlowering = "gather-cast-mul"', "embeddings.dtype"),
    ('dtype = "int4"\nsymmetric = true\ngranularity = "per-block"\nblock_size = 24\nlowering = "gather-block-quantized"', "embeddings.block_size"),
    ('dtype = "int4"\nsymmetric = false\ngranularity = "per-block"\nblock_size = 32\nlowering = "gather-block-quantized"', "embeddings.symmetric"),
    ('dtype = "int8"\nsymmetric = true\ngranularity = "per-channel"\nlowering = "dequantize-all"', "embeddings.lowering"),
    ('dtype = "int8"\nsymmetric = true\ngranularity = "per-channel"', "embeddings.lowering"),
])
def test_target_files_with_a_bad_embeddings_section_are_one_line_errors(tmp_path: Path, body: str, where: str) -> None:
    import re

    base = Path(load_target("ort-cpu-int4").path).read_text()
    text = re.sub(r"\[embeddings\]\n.*?\n\n", f"[embeddings]\n{body}\n\n", base, count=1, flags=re.DOTALL)
    assert text != base
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert_one_line_error(qc("targets", "show", path, cwd=tmp_path), "mine.toml", where)


def test_the_effective_target_shows_its_embeddings() -> None:
    text = target_to_toml(load_target("ort-cpu"))
    assert '[embeddings]\ndtype = "int8"' in text and 'lowering = "gather-cast-mul"' in text
