"""qat on real graphs: it trains the Q/DQ graph in place (same structure, codes within their width,
biases re-quantized at the new scales), lowers the error on held-out inputs, and the model it
writes runs the same in torch and in onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import qcompiler
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from tests.helpers import run, small_cnn

BASE = "infer-shapes,fold-constants,adaround{bits=4,iterations=0},calibrate,insert-qdq"


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)


def _stats(result) -> dict:
    return next(p.stats for p in result.report.passes if p.name == "qat")


def test_training_keeps_the_graph_and_writes_codes_scales_and_biases_that_agree() -> None:
    calib = DataSource({"input": _data(128)})
    before = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, pipeline=BASE, verify=False).model
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, pipeline=BASE + ",qat{epochs=3,lr=0.001,batch-size=32}", verify=False)
    model = result.model
    assert Counter(n.op_type for n in model.graph) == Counter(n.op_type for n in before.graph)
    stats = _stats(result)
    assert stats["loss"] == "kl" and len(stats["loss_per_epoch"]) == 3 and len(stats["layers"]) == 6
    assert stats["torch_vs_onnxruntime_sqnr_db"] > 30
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w_dq, b_dq, x_dq = node.inputs[1].producer(), node.inputs[2].producer(), node.inputs[0].producer()
        codes = w_dq.inputs[0].const_value.numpy()
        assert np.abs(codes).max() <= 7  # still 4-bit values
        w_scale = w_dq.inputs[1].const_value.numpy()
        x_scale = x_dq.inputs[1].const_value.numpy()
        # The int32 bias is re-quantized at the trained input scale x weight scale.
        np.testing.assert_array_equal(b_dq.inputs[1].const_value.numpy(), (np.float32(x_scale) * w_scale).astype(np.float32))
    # Something moved: scales or codes differ from the untrained graph.
    changed = [n for n in before.graph.initializers if not np.array_equal(before.graph.initializers[n].const_value.numpy(), model.graph.initializers[n].const_value.numpy())]
    assert changed


def test_training_recovers_what_post_training_quantization_lost_on_held_out_inputs() -> None:
    """4-bit weights rounded to nearest without bias correction lose much on this network (its
    global pooling sums every channel's shift); qat learns it back, on inputs it never saw. (With
    bias correction the post-training model is already near what 256 samples can teach here.)"""
    data = _data(384, seed=3)
    held_out = {"input": data[256:]}
    reference = run(small_cnn(), held_out)[0]
    errors = {}
    base = BASE.replace("insert-qdq", "insert-qdq{bias-correction=false}")
    for name, pipe in (("ptq", base), ("qat", base + ",qat{epochs=8,lr=0.001,batch-size=32,loss=mse}")):
        model = qcompiler.compile(small_cnn(), "ort-cpu", calibration=DataSource({"input": data[:256]}), pipeline=pipe, verify=False).model
        errors[name] = float(np.mean((run(model, held_out)[0] - reference) ** 2))
    assert errors["qat"] < 0.3 * errors["ptq"], errors


def test_labels_give_cross_entropy_and_the_torch_and_onnxruntime_top1() -> None:
    x = _data(96)
    labels = np.argmax(run(small_cnn(), {"input": x})[0], axis=1).astype(np.int64)
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=DataSource({"input": x}, labels), pipeline=BASE + ",qat{epochs=1}", verify=False)
    stats = _stats(result)
    assert stats["loss"] == "cross-entropy" and abs(stats["top1_torch"] - stats["top1_onnxruntime"]) <= 2.0


def test_before_insert_qdq_it_says_where_to_run() -> None:
    with pytest.raises(QCError, match="after insert-qdq"):
        qcompiler.compile(small_cnn(), "ort-cpu", calibration=DataSource({"input": _data(16)}), pipeline="infer-shapes,qat", verify=False)


def test_without_data_it_says_what_to_pass() -> None:
    with pytest.raises(QCError, match="--calib"):
        qcompiler.compile(small_cnn(), "ort-cpu", pipeline="infer-shapes,qat", verify=False)


def test_learned_activation_offsets_stay_integers_the_runtime_reads() -> None:
    """LSQ+ offsets: zero points train as floats rounded straight-through and are written back
    as integers of their own type; torch and onnxruntime still agree on the written model."""
    calib = DataSource({"input": _data(128)})
    before = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, pipeline=BASE, verify=False).model
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, verify=False,
                               pipeline=BASE + ",qat{epochs=3,lr=0.5,batch-size=32,schedule=constant,learn-activation-offsets=true,learn-activation-scales=false}")
    stats = _stats(result)
    assert stats["activation_offsets"] > 0 and stats["activation_offsets_moved"] > 0
    assert stats["torch_vs_onnxruntime_sqnr_db"] > 30
    moved = 0
    for node in result.model.graph:
        if node.op_type == "QuantizeLinear" and node.inputs[0].const_value is None:
            zp = node.inputs[2].const_value.numpy()
            old = before.graph.initializers[node.inputs[2].name].const_value.numpy()
            assert zp.dtype == old.dtype == np.uint8
            moved += int(zp != old)
    assert moved == stats["activation_offsets_moved"]


@pytest.mark.parametrize("isa", ["avx2", "avx512-vnni"])
def test_8_bit_weights_with_per_channel_zero_points_train_on_either_cpu(isa: str) -> None:
    """On an int16-pair CPU qat keeps each channel's pair-safe top; the zero point arrays that
    insert-qdq writes per channel broadcast along the weight's channel axis (they once did not:
    a Gemm's (10, 64) codes against a (10,) zero point raised)."""
    from qcompiler.targets.spec import load_target

    calib = DataSource({"input": _data(96)})
    pipe = "infer-shapes,fold-constants,calibrate,insert-qdq,qat{epochs=1,lr=0.001,batch-size=32}"
    result = qcompiler.compile(small_cnn(), load_target("ort-cpu", cpu=isa), calibration=calib, pipeline=pipe, verify=False)
    stats = _stats(result)
    # Full-range int8 weights saturate in this machine's kernels if it adds int16 pairs.
    if isa == "avx2" or load_target("ort-cpu").weights.pair_sum_limit is None:
        assert stats["torch_vs_onnxruntime_sqnr_db"] > 30
    for node in result.model.graph:
        if node.op_type in ("Conv", "Gemm"):
            codes = node.inputs[1].producer().inputs[0].const_value.numpy().astype(np.int64)
            assert np.abs(codes).max() <= 127
