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
