"""The low-bit training passes' shared parts: BN on batch statistics in the torch executor, BN
re-estimation, the label-free loss fallback and what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompiler.data import DataSource
from qcompiler.low_bit_training import reestimate_batchnorm
from qcompiler.torch_exec import BatchNormStatistics, TorchGraph
from qcompiler.training import loss_reason, resolve_loss
from tests.helpers import run, small_bn_cnn


def _x(n: int = 96) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)


def test_batchnorm_training_mode_normalises_with_the_batch_statistics() -> None:
    model = small_bn_cnn()
    x = _x()
    c0 = TorchGraph(model).run({"input": x}, ["c0"])["c0"]
    n0 = TorchGraph(model, batchnorm_training=True).run({"input": x}, ["n0"])["n0"]
    init = model.graph.initializers
    gamma, beta = (torch.from_numpy(np.array(init[k].const_value.numpy())) for k in ("gamma0", "beta0"))
    mean, var = c0.mean((0, 2, 3), keepdim=True), c0.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = (c0 - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    torch.testing.assert_close(n0, expected, rtol=1e-4, atol=1e-4)
    # Inference mode (the default) uses the stored statistics: a different result here.
    assert not torch.allclose(TorchGraph(model).run({"input": x}, ["n0"])["n0"], n0, atol=1e-2)


def test_statistics_are_those_of_every_sample_seen() -> None:
    model = small_bn_cnn()
    graph = TorchGraph(model, batchnorm_training=True)
    graph.batchnorm_statistics = stats = BatchNormStatistics()
    x = _x()
    for i in range(0, len(x), 32):
        graph.run({"input": x[i : i + 32]})
    c0 = TorchGraph(model).run({"input": x}, ["c0"])["c0"].double().numpy()
    mean, var = stats.result()["bn0"]
    np.testing.assert_allclose(mean, c0.mean((0, 2, 3)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(var, c0.var((0, 2, 3)), rtol=1e-5, atol=1e-8)


def test_reestimated_batchnorm_makes_inference_mode_match_the_data() -> None:
    model = small_bn_cnn()
    x = _x(256)
    assert reestimate_batchnorm(model, DataSource({"input": x}), {}, 256, batch_size=64) == 2
    c0 = TorchGraph(model).run({"input": x}, ["c0"])["c0"].double().numpy()
    np.testing.assert_allclose(model.graph.initializers["mean0"].const_value.numpy(), c0.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.graph.initializers["var0"].const_value.numpy(), c0.var((0, 2, 3)), rtol=1e-4, atol=1e-6)
    # Normalised by its own statistics, the first BN's output has each channel's mean = beta.
    n0 = run(model, {"input": x})  # onnxruntime runs the re-estimated model
    assert n0[0].shape == (256, 5)


def test_label_free_losses_say_why() -> None:
    model = small_bn_cnn()
    graph = TorchGraph(model)
    x = _x(16)
    unlabelled = DataSource({"input": x})
    assert resolve_loss(graph, unlabelled, "logits", "auto", 8, "slb") == "kl"
    assert "KL divergence" in loss_reason("kl", unlabelled, "logits", "auto")
    # A non-classifier output (a feature map): mean squared error to the float model, said so.
    assert resolve_loss(graph, unlabelled, "r1", "auto", 8, "slb") == "mse"
    assert "not a classifier" in loss_reason("mse", unlabelled, "r1", "auto")
    labelled = DataSource({"input": x}, np.zeros(16, np.int64))
    assert resolve_loss(graph, labelled, "logits", "auto", 8, "slb") == "cross-entropy"
    assert loss_reason("cross-entropy", labelled, "logits", "auto") is None
    assert resolve_loss(graph, labelled, "logits", "cross-entropy+kl", 8, "slb") == "cross-entropy+kl"
    from qcompiler.errors import QCError

    with pytest.raises(QCError, match="needs 'labels'"):
        resolve_loss(graph, unlabelled, "logits", "cross-entropy+kl", 8, "slb")
    with pytest.raises(QCError, match="classifier output"):
        resolve_loss(graph, labelled, "r1", "cross-entropy", 8, "slb")
