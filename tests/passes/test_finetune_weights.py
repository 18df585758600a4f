"""finetune-weights: retraining after pruning recovers the loss, pruned weights stay exactly zero,
and the label-free loss pulls the pruned network back towards the unpruned one."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import parse_pipeline
from qcompiler.targets.spec import load_target
from tests.helpers import run
from tests.passes.test_cluster_weights import _cross_entropy, _data, _kl, _net, _run


def _conv_weights(model) -> dict[str, np.ndarray]:
    return {n: model.graph.initializers[n].const_value.numpy().copy() for n in ("w1", "w2", "w3", "w4")}


def test_retraining_lowers_the_loss_and_keeps_pruned_weights_at_zero() -> None:
    model, ctx = _run(_net(np.random.default_rng(3)), "prune-magnitude{ratio=0.6}")
    pruned = _conv_weights(model)
    x, labels = _data().arrays["x"], _data().labels
    loss_before = _cross_entropy(run(model, {"x": x})[0], labels)
    tuned = parse_pipeline("finetune-weights{epochs=30,batch-size=8,lr=0.01}").run(model, ctx).model
    after = _conv_weights(tuned)
    for name, mask in ctx.facts["pruned"].items():
        assert np.all(after[name][mask] == 0.0), name
        assert not np.allclose(after[name][~mask], pruned[name][~mask]), name
    assert _cross_entropy(run(tuned, {"x": x})[0], labels) < 0.7 * loss_before
    stats = ctx.stats["finetune-weights"]
    assert stats["loss"] == "cross-entropy" and stats["held_at_zero"] == sum(int(m.sum()) for m in ctx.facts["pruned"].values())
    assert stats["loss_per_epoch"][-1] < stats["loss_per_epoch"][0]


def test_without_labels_it_pulls_the_pruned_network_back_to_the_float_one() -> None:
    float_model = _net(np.random.default_rng(4))
    model, ctx = _run(_net(np.random.default_rng(4)), "prune-magnitude{ratio=0.6}")
    ctx.data = DataSource({"x": _data().arrays["x"]})
    x = _data().arrays["x"]
    float_out = run(float_model, {"x": x})[0]
    gap_before = _kl(float_out, run(model, {"x": x})[0])
    tuned = parse_pipeline("finetune-weights{epochs=30,batch-size=8,lr=0.01}").run(model, ctx).model
    assert ctx.stats["finetune-weights"]["loss"] == "kl"
    assert _kl(float_out, run(tuned, {"x": x})[0]) < 0.5 * gap_before
    assert all(np.all(tuned.graph.initializers[n].const_value.numpy()[m] == 0) for n, m in ctx.facts["pruned"].items())


def test_a_shared_weight_stays_one_tensor() -> None:
    model, ctx = _run(_net(np.random.default_rng(5), shared=True), "prune-magnitude{ratio=0.5},finetune-weights{epochs=2,batch-size=8}")
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert convs[1].inputs[1] is convs[2].inputs[1]


def test_retraining_needs_data() -> None:
    ctx = PassContext(target=load_target("ort-cpu"))
    with pytest.raises(QCError, match="--calib"):
        parse_pipeline("finetune-weights").run(_net(np.random.default_rng(6)), ctx)


def test_options_are_checked() -> None:
    with pytest.raises(QCError, match="epochs"):
        parse_pipeline("finetune-weights{epochs=0}")


def test_augmented_retraining_runs_on_image_inputs_and_keeps_zeros() -> None:
    model, ctx = _run(_net(np.random.default_rng(7)), "prune-magnitude{ratio=0.6}")
    rng = np.random.default_rng(8)
    ctx.data = DataSource({"x": rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)}, rng.integers(0, 4, 32))
    tuned = parse_pipeline("finetune-weights{epochs=3,batch-size=8,lr=0.01,augment=crop-flip}").run(model, ctx).model
    assert all(np.all(tuned.graph.initializers[n].const_value.numpy()[m] == 0) for n, m in ctx.facts["pruned"].items())
    assert len(ctx.stats["finetune-weights"]["loss_per_epoch"]) == 3


def test_augmentation_needs_an_image_input() -> None:
    model, ctx = _run(_net(np.random.default_rng(7)), "prune-magnitude{ratio=0.6}")  # 6x6 inputs: too small to crop
    with pytest.raises(QCError, match=r"augment=crop needs an image input.*x \(32, 3, 6, 6\)"):
        parse_pipeline("finetune-weights{augment=crop}").run(model, ctx)
    with pytest.raises(QCError, match="augment"):
        parse_pipeline("finetune-weights{augment=rotate}")


def test_batchnorm_scale_and_shift_are_retrained_but_not_its_statistics() -> None:
    from onnx import helper

    from tests.helpers import bn_node, bn_params, make_model, tensor_info

    rng = np.random.default_rng(11)
    inits = {"w": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), **bn_params(rng, 8), "fc": rng.normal(0, 0.3, (4, 8)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "b"),
             helper.make_node("Relu", ["b"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [tensor_info("x", [None, 3, 6, 6])], [tensor_info("y", [None, 4])], inits)
    model, ctx = _run(model, "prune-magnitude{ratio=0.5},finetune-weights{epochs=5,batch-size=8,lr=0.01}")
    value = {n: model.graph.initializers[n].const_value.numpy() for n in inits}
    assert not np.allclose(value["gamma"], inits["gamma"]) and not np.allclose(value["beta"], inits["beta"])
    assert np.array_equal(value["mean"], inits["mean"]) and np.array_equal(value["var"], inits["var"])
    assert ctx.stats["finetune-weights"]["tensors"] == 4
