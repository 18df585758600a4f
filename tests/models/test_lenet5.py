"""The bundled MNIST LeNet-5: onnxruntime scores it at >= 99 % on the MNIST test set, and its
preprocessing is the one the training script used."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from qcompiler.runtime import make_session

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "mnist_lenet5.onnx"
sys.path.insert(0, str(ROOT / "models"))
import train_lenet5_mnist as lenet  # noqa: E402

pytestmark = pytest.mark.skipif(not lenet.MNIST.exists(), reason="../shared/data/mnist.npz missing")


def test_bundled_lenet5_is_at_least_99_percent_accurate() -> None:
    test = lenet.make_npz("test")
    session = make_session(str(MODEL))
    logits = np.concatenate([session.run(None, {"input": test["input"][i : i + 2000]})[0] for i in range(0, len(test["input"]), 2000)])
    assert (logits.argmax(axis=1) == test["labels"]).mean() >= 0.99


def test_it_is_the_caffe_lenet5_of_the_paper() -> None:
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(MODEL)).graph.initializer if len(t.dims) >= 2]
    assert sum(w.size for w in weights) == 20 * 25 + 50 * 20 * 25 + 800 * 500 + 500 * 10  # 430,500
