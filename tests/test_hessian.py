"""hessian-trace: Hutchinson estimates agree with exact Hessian traces on a model small enough to
build the whole Hessian; the pass records the loss it used and refuses models without a float loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

import qcompiler
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.hessian import HessianTrace
from qcompiler.pass_manager import PassContext
from qcompiler.targets.spec import load_target
from qcompiler.torch_exec import TorchGraph
from tests.helpers import make_model, tensor_info


def _mlp(rng: np.random.Generator):
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Tanh", ["h"], ["a"], name="tanh"),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2"),
        ],
        [tensor_info("x", [None, 5])],
        [tensor_info("y", [None, 3])],
        {"w1": rng.normal(0, 0.8, (5, 4)).astype(np.float32), "w2": rng.normal(0, 0.8, (4, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)},
    )


def _exact_traces(model, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Tr of each weight's Hessian block of the mean cross-entropy, by building the block."""
    graph = TorchGraph(model, trainable=["w1", "w2"], dtype=torch.float64)
    params = graph.named_weights()
    xt, yt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(labels)
    traces = {}
    for name, w in params.items():
        loss = torch.nn.functional.cross_entropy(graph(x=xt)[0], yt)
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        flat = grad.reshape(-1)
        traces[name] = sum(float(torch.autograd.grad(flat[i], w, retain_graph=True)[0].reshape(-1)[i]) for i in range(flat.numel()))
    return traces


def test_hutchinson_traces_match_the_exact_traces() -> None:
    rng = np.random.default_rng(0)
    model = _mlp(rng)
    x = rng.normal(0, 1, (64, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 64)
    exact = _exact_traces(model, x, labels)
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": x}, labels))
    # One batch holding all samples: the estimate is of exactly the Hessian computed above.
    # w1's exact trace is close to zero, so a relative tolerance cannot be met: all probes run.
    result = ctx.analyses.get(HessianTrace(tolerance=0.05, max_probes=2000, batch_size=64, samples=64), model, ctx)
    assert result.loss == "cross-entropy" and result.probes == 2000 and not result.converged
    for name, estimate in result.estimates.items():
        lo, hi = estimate.ci95
        assert abs(estimate.trace - exact[name]) <= max(3 * estimate.stderr, 1e-6), (name, estimate, exact[name])
        assert lo < estimate.trace < hi
        assert estimate.parameters == {"w1": 20, "w2": 12}[name]
    # w2 reached the tolerance long before and stopped being probed; w1 used every probe.
    w1, w2 = result.estimates["w1"], result.estimates["w2"]
    assert w1.probes == 2000 and 8 <= w2.probes < 2000 and w2.relative_stderr < 0.05


def test_label_free_loss_and_its_name_in_the_report() -> None:
    rng = np.random.default_rng(1)
    data = DataSource({"x": rng.normal(0, 1, (32, 5)).astype(np.float32)})
    result = qcompiler.compile(_mlp(rng), calibration=data, verify=False, pipeline="hessian-trace{max-probes=16}")
    stats = result.report.passes[0].stats
    assert stats["loss"] == "kl"  # no labels, classifier-shaped output: KL against the float model
    assert set(stats["traces"]) == {"w1", "w2"} and all(t["trace"] > 0 for t in stats["traces"].values())


def test_model_without_float_output_is_refused() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("ArgMax", ["m"], ["y"], name="argmax", axis=1)],
        [tensor_info("x", [None, 5])],
        [tensor_info("y", [None, 1], 7)],
        {"w": np.ones((5, 3), np.float32)},
    )
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": np.ones((4, 5), np.float32)}))
    with pytest.raises(QCError, match="not float"):
        ctx.analyses.get(HessianTrace(), model, ctx)


def _exact_diagonals(model, x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    graph = TorchGraph(model, trainable=["w1", "w2"], dtype=torch.float64)
    xt, yt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(labels)
    out = {}
    for name, w in graph.named_weights().items():
        loss = torch.nn.functional.cross_entropy(graph(x=xt)[0], yt)
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        flat = grad.reshape(-1)
        out[name] = np.array([float(torch.autograd.grad(flat[i], w, retain_graph=True)[0].reshape(-1)[i]) for i in range(flat.numel())]).reshape(w.shape)
    return out


def test_hutchinson_diagonal_matches_the_exact_diagonal() -> None:
    from qcompiler.hessian import HessianDiagonal

    rng = np.random.default_rng(0)
    model = _mlp(rng)
    x = rng.normal(0, 1, (64, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 64)
    exact = _exact_diagonals(model, x, labels)
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": x}, labels))
    estimate = ctx.analyses.get(HessianDiagonal(probes=3000, batch_size=64, samples=64), model, ctx)
    for name in exact:
        assert estimate[name].shape == exact[name].shape
        # Monte-Carlo error ~ off-diagonal mass / sqrt(probes): a few percent of the scale here.
        assert np.max(np.abs(estimate[name] - exact[name])) < 0.05 * np.max(np.abs(exact[name])) + 1e-3


@pytest.mark.parametrize("batch", [1, 4])
def test_fisher_diagonal_is_the_mean_squared_batch_gradient(batch: int) -> None:
    from qcompiler.hessian import HessianDiagonal

    rng = np.random.default_rng(1)
    model = _mlp(rng)
    x = rng.normal(0, 1, (12, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 12)
    graph = TorchGraph(model, trainable=["w1", "w2"])
    w2 = graph.named_weights()["w2"]
    expected = np.zeros(w2.shape)
    for i in range(0, 12, batch):
        loss = torch.nn.functional.cross_entropy(graph(x=torch.from_numpy(x[i : i + batch]))[0], torch.from_numpy(labels[i : i + batch]))
        expected += torch.autograd.grad(loss, w2)[0].numpy() ** 2 / (12 // batch)
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": x}, labels))
    fisher = ctx.analyses.get(HessianDiagonal(method="fisher", samples=12, fisher_batch_size=batch), model, ctx)
    np.testing.assert_allclose(fisher["w2"], expected, rtol=1e-4, atol=1e-8)
    assert np.all(fisher["w1"] >= 0)


def test_trace_cache_is_reused_only_for_the_same_model_data_and_options(tmp_path) -> None:
    rng = np.random.default_rng(3)
    model = _mlp(rng)
    cache = tmp_path / "traces.json"
    data = DataSource({"x": rng.normal(0, 1, (32, 5)).astype(np.float32)}, rng.integers(0, 3, 32))

    def traces(**options):
        ctx = PassContext(target=load_target("ort-cpu"), data=data)
        return ctx.analyses.get(HessianTrace(max_probes=12, cache=str(cache), **options), model, ctx)

    first = traces()
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    again = traces()
    assert again == first and cache.stat().st_mtime_ns == stamp  # read back, not recomputed
    other = traces(seed=1)  # different options: recomputed and the file replaced
    assert other.estimates["w1"].trace != first.estimates["w1"].trace and cache.stat().st_mtime_ns != stamp


# --------------------------------------------------------------------------------------------
# gauss-newton: one backward pass per probe for every layer, where it is exact
# --------------------------------------------------------------------------------------------


def _relu_mlp(rng: np.random.Generator, hidden_op: str = "Relu"):
    """x -> MatMul(w1) -> Relu -> Gemm(w2, b2): piecewise linear in each weight."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node(hidden_op, ["h"], ["a"], name="act"),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2"),
        ],
        [tensor_info("x", [None, 5])],
        [tensor_info("y", [None, 3])],
        {"w1": rng.normal(0, 0.8, (5, 6)).astype(np.float32), "w2": rng.normal(0, 0.8, (6, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)},
    )


def _exact_loss_traces(model, x: np.ndarray, loss_name: str, labels: np.ndarray | None) -> dict[str, float]:
    """Tr of each weight's Hessian block of `task_loss` (float64, the whole block built)."""
    from qcompiler.training import task_loss

    graph = TorchGraph(model, trainable=["w1", "w2"], dtype=torch.float64)
    xt = torch.from_numpy(x.astype(np.float64))
    with torch.no_grad():
        reference = graph(x=xt)[0]  # the float outputs the label-free losses compare against
    traces = {}
    for name, w in graph.named_weights().items():
        loss = task_loss(loss_name, graph(x=xt)[0], labels, reference)
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        flat = grad.reshape(-1)
        traces[name] = sum(float(torch.autograd.grad(flat[i], w, retain_graph=True)[0].reshape(-1)[i]) for i in range(flat.numel()))
    return traces


@pytest.mark.parametrize("loss", ["cross-entropy", "kl", "mse"])
def test_gauss_newton_traces_match_the_exact_traces(loss: str) -> None:
    rng = np.random.default_rng(4)
    model = _relu_mlp(rng)
    x = rng.normal(0, 1, (64, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 64)
    exact = _exact_loss_traces(model, x, loss, labels if loss == "cross-entropy" else None)
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": x}, labels))
    result = ctx.analyses.get(HessianTrace(tolerance=0.03, max_probes=5000, batch_size=64, samples=64, loss=loss), model, ctx)
    assert result.estimator == "gauss-newton" and result.converged
    for name, estimate in result.estimates.items():
        assert exact[name] > 0
        assert abs(estimate.trace - exact[name]) <= 3 * estimate.stderr, (name, estimate, exact[name])
        assert estimate.relative_stderr < 0.03
        # One probe covers every layer: none stops early.
        assert estimate.probes == result.probes


@pytest.mark.parametrize("loss", ["cross-entropy", "kl", "mse"])
def test_output_hessian_root_squares_to_the_loss_hessian(loss: str) -> None:
    from qcompiler.hessian import _output_hessian_root
    from qcompiler.training import task_loss

    rng = np.random.default_rng(5)
    out = torch.from_numpy(rng.normal(0, 2, (4, 3)))
    labels = rng.integers(0, 3, 4)
    hessian = torch.autograd.functional.hessian(lambda z: task_loss(loss, z, labels, out), out).reshape(12, 12)
    root = _output_hessian_root(loss, out)
    columns = torch.stack([root(e.reshape(4, 3)).reshape(-1) for e in torch.eye(12, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(columns @ columns.T, hessian, rtol=1e-9, atol=1e-12)


def test_gauss_newton_blocker_names_the_curved_node() -> None:
    from qcompiler.hessian import gauss_newton_blocker

    rng = np.random.default_rng(6)
    assert gauss_newton_blocker(_relu_mlp(rng), ["w1", "w2"]) is None
    assert "Tanh node 'act'" in gauss_newton_blocker(_relu_mlp(rng, "Tanh"), ["w1", "w2"])
    square = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Mul", ["h", "h"], ["y"], name="square")],
        [tensor_info("x", [None, 5])],
        [tensor_info("y", [None, 3])],
        {"w": np.ones((5, 3), np.float32)},
    )
    assert "Mul node 'square' multiplies a weight by itself" in gauss_newton_blocker(square, ["w"])
    # A constant divisor is fine; a weight-dependent one is not.
    divided = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Div", ["h", "two"], ["y"], name="half")],
        [tensor_info("x", [None, 5])],
        [tensor_info("y", [None, 3])],
        {"w": np.ones((5, 3), np.float32), "two": np.full(3, 2, np.float32)},
    )
    assert gauss_newton_blocker(divided, ["w"]) is None


def test_bundled_resnet_is_piecewise_linear_in_each_weight() -> None:
    from pathlib import Path

    from qcompiler.hessian import gauss_newton_blocker, quantizable_weights
    from qcompiler.ir import load_model

    path = Path(__file__).resolve().parents[1] / "models" / "cifar10_resnet20.onnx"
    if not path.exists():
        pytest.skip("bundled model missing")
    model = load_model(path)  # batch norm not folded: affine in its input, still exact
    assert gauss_newton_blocker(model, quantizable_weights(model)) is None


def test_report_says_which_estimator_ran() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (40, 5)).astype(np.float32)
    data = DataSource({"x": x}, rng.integers(0, 3, 40))
    stats = {}
    for act in ("Relu", "Tanh"):
        result = qcompiler.compile(_relu_mlp(rng, act), calibration=data, verify=False, pipeline="hessian-trace{max-probes=12,batch-size=16}")
        stats[act] = result.report.passes[0].stats
    assert stats["Relu"]["estimator"] == "gauss-newton" and stats["Tanh"]["estimator"] == "hessian-vector"
    # gauss-newton sees every sample before it trusts an error estimate: 3 batches of 16 here (min 8 probes).
    assert stats["Relu"]["probes"] >= 8 and all(t["probes"] == stats["Relu"]["probes"] for t in stats["Relu"]["traces"].values())
    forced = qcompiler.compile(_relu_mlp(np.random.default_rng(7), "Tanh"), calibration=data, verify=False, pipeline="hessian-trace{max-probes=12,estimator=gauss-newton}")
    assert forced.report.passes[0].stats["estimator"] == "gauss-newton"
