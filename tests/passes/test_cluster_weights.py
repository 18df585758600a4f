"""prune-magnitude and cluster-weights: what onnxruntime runs is exactly the codebook the pass
chose; pruned weights stay zero; shared weights are clustered once; bad options name themselves."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qcompiler.codebook import PRUNED_FACT
from qcompiler.codebook.clustering import entropy_bits
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.ir import annotate_types
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import parse_pipeline
from qcompiler.targets.spec import load_target
from tests.helpers import make_model, run, tensor_info


def _net(rng: np.random.Generator, shared: bool = False, fp16_weight: bool = False):
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w2" if shared else "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w4"], ["y"], name="fc", transB=1),
    ]
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w2": w2, "w4": rng.normal(0, 0.3, (4, 8)).astype(np.float32)}
    if not shared:
        inits["w3"] = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    model = make_model(nodes, [tensor_info("x", [None, 3, 6, 6])], [tensor_info("y", [None, 4])], inits)
    annotate_types(model)
    return model


def _data() -> DataSource:
    rng = np.random.default_rng(9)
    return DataSource({"x": rng.normal(0, 1, (32, 3, 6, 6)).astype(np.float32)}, rng.integers(0, 4, 32))


def _run(model: ir.Model, pipeline: str) -> tuple[ir.Model, PassContext]:
    ctx = PassContext(target=load_target("ort-cpu"), data=_data())
    return parse_pipeline(pipeline).run(model, ctx).model, ctx


def _effective_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Each clustered weight as the model computes it: codebook[indices], or step x (index - zero
    point) for a grid, from the initializers."""
    out = {}
    for node in model.graph:
        if node.op_type == "Gather" and "qc.source" in node.metadata_props:
            codebook = node.inputs[0].const_value.numpy()
            indices = node.inputs[1].producer().inputs[0].const_value.numpy()
            out[node.metadata_props["qc.source"]] = codebook[indices.astype(np.int64)]
        elif node.op_type == "DequantizeLinear" and "qc.source" in node.metadata_props:
            q, step, zp = (v.const_value.numpy() for v in node.inputs)
            out[node.metadata_props["qc.source"]] = (q.astype(np.float32) - np.float32(zp)) * step
    return out


def test_onnxruntime_runs_exactly_the_codebook_values() -> None:
    rng = np.random.default_rng(0)
    model, _ = _run(_net(rng), "cluster-weights{method=kmeans,clusters=6,scope=layer}")
    effective = _effective_weights(model)
    assert set(effective) == {"w1", "w2", "w3", "w4"}
    for name, w in effective.items():
        assert len(np.unique(w)) <= 6
    # The same network with the reconstructed weights as plain initializers gives identical outputs.
    reference = _net(np.random.default_rng(0))
    for name, w in effective.items():
        reference.graph.initializers[name].const_value = ir.tensor(w.astype(np.float32), name=name)
    x = _data().arrays["x"]
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(reference, {"x": x})[0])
    indices = [n.inputs[0].const_value for n in model.graph if n.op_type == "Cast"]
    assert {t.dtype for t in indices} == {ir.DataType.UINT8}


def test_network_scope_shares_one_codebook() -> None:
    model, ctx = _run(_net(np.random.default_rng(1)), "cluster-weights{method=kmeans,clusters=5}")
    codebooks = {n.inputs[0].name for n in model.graph if n.op_type == "Gather"}
    assert len(codebooks) == 1 and ctx.stats["cluster-weights"]["codebooks"] == 1


def test_a_shared_weight_is_clustered_once_and_stays_shared() -> None:
    model, ctx = _run(_net(np.random.default_rng(2), shared=True), "cluster-weights{method=kmeans,clusters=4,scope=layer}")
    gathers = [n for n in model.graph if n.op_type == "Gather" and n.metadata_props.get("qc.source") == "w2"]
    assert len(gathers) == 1
    users = {u.node.name for u in gathers[0].outputs[0].uses()}
    assert users == {"conv2", "conv3"}
    assert ctx.stats["cluster-weights"]["clustered"] == 3


def test_pruned_weights_stay_exactly_zero() -> None:
    model, ctx = _run(_net(np.random.default_rng(3)), "prune-magnitude{ratio=0.7},cluster-weights{method=hessian-kmeans,clusters=4}")
    masks = ctx.facts[PRUNED_FACT]
    for name, w in _effective_weights(model).items():
        assert np.all(w[masks[name]] == 0.0)
        assert abs(masks[name].mean() - 0.7) < 0.05
        assert np.count_nonzero(w[~masks[name]] == 0.0) == 0  # no unpruned weight became zero


@pytest.mark.parametrize("method", ["uniform", "ecsq"])
def test_target_bits_sets_the_index_entropy(method: str) -> None:
    model, ctx = _run(_net(np.random.default_rng(4)), f"cluster-weights{{method={method},clusters=32,target-bits=2.5}}")
    values = np.concatenate([w.ravel() for w in _effective_weights(model).values()])
    _, assignment = np.unique(values, return_inverse=True)
    assert abs(entropy_bits(assignment, assignment.max() + 1) - 2.5) < 0.1
    assert abs(ctx.stats["cluster-weights"]["entropy_bits"] - 2.5) < 0.1


@pytest.mark.parametrize("prune", [0.0, 0.6])
def test_grid_centres_are_stored_as_dequantize_linear_that_onnxruntime_runs_exactly(prune: float) -> None:
    pipeline = (f"prune-magnitude{{ratio={prune}}}," if prune else "") + "cluster-weights{method=uniform,target-bits=2.5,centres=grid}"
    model, ctx = _run(_net(np.random.default_rng(12)), pipeline)
    assert not [n for n in model.graph if n.op_type == "Gather"]
    lookups = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(lookups) == 4 and len({n.inputs[1].name for n in lookups}) == 1  # network scope: one step
    step = float(lookups[0].inputs[1].const_value.numpy())
    effective = _effective_weights(model)
    for name, w in effective.items():
        levels = w / step
        np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)  # every value on the grid
        if prune:
            assert np.all(w[ctx.facts[PRUNED_FACT][name]] == 0.0)
            assert lookups[0].metadata_props["qc.codebook.zero_index"] == str(int(lookups[0].inputs[2].const_value.numpy()))
    reference = _net(np.random.default_rng(12))
    for name, w in effective.items():
        reference.graph.initializers[name].const_value = ir.tensor(w.astype(np.float32), name=name)
    x = _data().arrays["x"]
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(reference, {"x": x})[0])


def test_grid_centres_need_the_uniform_method() -> None:
    with pytest.raises(QCError, match="centres=grid"):
        parse_pipeline("cluster-weights{method=kmeans,centres=grid}")


def test_finetuning_a_grid_trains_its_step_and_keeps_it_a_grid() -> None:
    model, ctx = _run(_net(np.random.default_rng(13)), "prune-magnitude{ratio=0.5},cluster-weights{method=uniform,clusters=7,centres=grid}")
    indices_before = {n.inputs[0].name: n.inputs[0].const_value.numpy().copy() for n in model.graph if n.op_type == "DequantizeLinear"}
    step_before = float(next(n for n in model.graph if n.op_type == "DequantizeLinear").inputs[1].const_value.numpy())
    x, labels = _data().arrays["x"], _data().labels
    loss_before = _cross_entropy(run(model, {"x": x})[0], labels)
    tuned = parse_pipeline("finetune-codebook{epochs=20,batch-size=8,lr=0.01}").run(model, ctx).model
    lookups = [n for n in tuned.graph if n.op_type == "DequantizeLinear"]
    assert all(np.array_equal(n.inputs[0].const_value.numpy(), indices_before[n.inputs[0].name]) for n in lookups)
    assert float(lookups[0].inputs[1].const_value.numpy()) != step_before
    assert _cross_entropy(run(tuned, {"x": x})[0], labels) < loss_before


def test_unreachable_target_rate_is_refused() -> None:
    with pytest.raises(QCError) as info:
        _run(_net(np.random.default_rng(5)), "cluster-weights{method=ecsq,clusters=4,target-bits=3}")
    assert info.value.option == "target-bits" and "at most" in info.value.message


def test_more_clusters_than_weights_is_refused() -> None:
    with pytest.raises(QCError) as info:
        _run(_net(np.random.default_rng(6)), "cluster-weights{method=kmeans,clusters=40,scope=layer}")
    assert info.value.option == "clusters" and "w4" in info.value.message  # the 4x8 Gemm weight


def test_a_weight_that_is_not_float32_is_skipped_and_reported() -> None:
    rng = np.random.default_rng(7)
    model = make_model(
        [helper.make_node("Cast", ["x"], ["x16"], name="to16", to=TensorProto.FLOAT16), helper.make_node("MatMul", ["x16", "w16"], ["h"], name="mm16"),
         helper.make_node("Cast", ["h"], ["h32"], name="to32", to=TensorProto.FLOAT), helper.make_node("MatMul", ["h32", "w"], ["y"], name="mm")],
        [tensor_info("x", [None, 4])], [tensor_info("y", [None, 3])],
        {"w16": rng.normal(0, 1, (4, 5)).astype(np.float16), "w": rng.normal(0, 1, (5, 3)).astype(np.float32)},
    )
    annotate_types(model)
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": rng.normal(0, 1, (8, 4)).astype(np.float32)}))
    result = parse_pipeline("cluster-weights{method=kmeans,clusters=3}").run(model, ctx)
    assert ctx.stats["cluster-weights"]["skipped"] == ["w16"] and ctx.stats["cluster-weights"]["clustered"] == 1
    assert any("w16" in d.message and "not float32" in d.message for d in ctx.diagnostics)
    assert "w16" in result.model.graph.initializers


def test_finetune_moves_centres_keeps_indices_and_zeros() -> None:
    model, ctx = _run(_net(np.random.default_rng(8)), "prune-magnitude{ratio=0.5},cluster-weights{method=kmeans,clusters=3}")
    before = {n.inputs[1].producer().inputs[0].name: n.inputs[1].producer().inputs[0].const_value.numpy().copy() for n in model.graph if n.op_type == "Gather"}
    codebook_before = next(n.inputs[0].const_value.numpy().copy() for n in model.graph if n.op_type == "Gather")
    x = _data().arrays["x"]
    loss_before = _cross_entropy(run(model, {"x": x})[0], _data().labels)
    tuned = parse_pipeline("finetune-codebook{epochs=20,batch-size=8,lr=0.01}").run(model, ctx).model
    after = {n.inputs[1].producer().inputs[0].name: n.inputs[1].producer().inputs[0].const_value.numpy() for n in tuned.graph if n.op_type == "Gather"}
    codebook_after = next(n.inputs[0].const_value.numpy() for n in tuned.graph if n.op_type == "Gather")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert codebook_after[0] == 0.0 and not np.allclose(codebook_after[1:], codebook_before[1:])
    assert _cross_entropy(run(tuned, {"x": x})[0], _data().labels) < loss_before
    assert ctx.stats["finetune-codebook"]["loss"] == "cross-entropy"


def test_finetune_without_labels_matches_the_float_network() -> None:
    rng = np.random.default_rng(10)
    model, ctx = _run(_net(rng), "cluster-weights{method=kmeans,clusters=3}")
    ctx.data = DataSource({"x": _data().arrays["x"]})  # no labels: KL to the float weights
    x = _data().arrays["x"]
    float_out = run(_net(np.random.default_rng(10)), {"x": x})[0]
    gap_before = _kl(float_out, run(model, {"x": x})[0])
    tuned = parse_pipeline("finetune-codebook{epochs=20,batch-size=8,lr=0.01}").run(model, ctx).model
    assert ctx.stats["finetune-codebook"]["loss"] == "kl"
    assert _kl(float_out, run(tuned, {"x": x})[0]) < 0.8 * gap_before


def test_finetune_needs_clustered_weights() -> None:
    with pytest.raises(QCError, match="cluster-weights"):
        _run(_net(np.random.default_rng(11)), "finetune-codebook")


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def _kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p_log = log_softmax(reference_logits)
    return float((np.exp(p_log) * (p_log - log_softmax(logits))).sum(axis=1).mean())


def test_exact_zeros_of_an_already_pruned_model_are_kept_as_pruned() -> None:
    # Pruned in one compile, clustered in the next: the masks are gone, the zeros are not.
    pruned, _ = _run(_net(np.random.default_rng(14)), "prune-magnitude{ratio=0.7}")
    zeros = {n: pruned.graph.initializers[n].const_value.numpy() == 0 for n in ("w1", "w2", "w3", "w4")}
    model, ctx = _run(pruned, "cluster-weights{method=kmeans,clusters=4}")
    assert PRUNED_FACT not in ctx.facts
    for name, w in _effective_weights(model).items():
        assert np.array_equal(w == 0.0, zeros[name]), name
    assert next(n for n in model.graph if n.op_type == "Gather").metadata_props["qc.codebook.zero_index"] == "0"
    again, _ = _run(_net(np.random.default_rng(14)), "prune-magnitude{ratio=0.7}")
    kept, _ = _run(again, "cluster-weights{method=kmeans,clusters=4,keep-zeros=false}")
    assert next(n for n in kept.graph if n.op_type == "Gather").metadata_props["qc.codebook.zero_index"] == ""


def test_ecsq_assignment_weight_layer_scale_evens_out_relative_error_across_layers() -> None:
    # One network codebook for weights of very different scales: weighing the assignment by each
    # layer's scale keeps the small layer's relative error near the large one's.
    def relative_errors(pipeline: str) -> dict[str, float]:
        original = _net(np.random.default_rng(21))
        original.graph.initializers["w4"].const_value = ir.tensor(original.graph.initializers["w4"].const_value.numpy() * 20, name="w4")
        floats = {n: original.graph.initializers[n].const_value.numpy().copy() for n in ("w1", "w2", "w3", "w4")}
        model, _ = _run(original, pipeline)
        effective = _effective_weights(model)
        return {n: float(np.sum((effective[n] - w) ** 2) / np.sum(w**2)) for n, w in floats.items()}

    scaled = relative_errors("cluster-weights{method=ecsq,clusters=32,target-bits=2,assignment-weight=layer-scale}")
    unit = relative_errors("cluster-weights{method=ecsq,clusters=32,target-bits=2}")  # the default
    assert max(scaled.values()) / min(scaled.values()) < max(unit.values()) / min(unit.values())


def test_assignment_weight_needs_the_ecsq_method() -> None:
    with pytest.raises(QCError, match="assignment-weight"):
        parse_pipeline("cluster-weights{method=uniform,assignment-weight=hessian}")
