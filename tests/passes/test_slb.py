"""slb on a small Conv-BN network: BN trains on batch statistics, the hard weights are the codes
insert-qdq stores after fold-batchnorm, and the written model runs the same in torch and onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

import qcompiler
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from tests.helpers import run, small_bn_cnn

TAIL = "fold-batchnorm,calibrate,insert-qdq"


def _calib(n: int = 384, seed: int = 0) -> DataSource:
    x = np.random.default_rng(seed).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)
    labels = run(small_bn_cnn(), {"input": x})[0].argmax(1).astype(np.int64)
    return DataSource({"input": x}, labels)


def _stats(result, name: str = "slb") -> dict:
    return next(p.stats for p in result.report.passes if p.name == name)


def _weight_codes(model) -> dict[str, np.ndarray]:
    out = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm"):
            dq = node.inputs[1].producer()
            assert dq is not None and dq.op_type == "DequantizeLinear"
            out[node.name] = dq.inputs[0].const_value.numpy().astype(np.int64)
    return out


@pytest.mark.parametrize("bits, codes", [(2, {-1, 0, 1}), (1, {-1, 1})])
def test_hard_weights_are_the_stored_codes_after_bn_is_folded(bits: int, codes: set[int]) -> None:
    pipeline = f"infer-shapes,fold-constants,slb{{bits={bits},epochs=2,batch-size=32,check-samples=128}},{TAIL}"
    result = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    model = result.model
    assert not any(n.op_type == "BatchNormalization" for n in model.graph)
    stored = _weight_codes(model)
    assert len(stored) == 3
    for name, q in stored.items():
        assert set(np.unique(q)) <= codes, name
    stats = _stats(result)
    assert stats["batchnorm_reestimated"] == 2 and stats["final_temperature"] == pytest.approx(10.0)
    assert len(stats["layers"]) == 3 and all(r["bits"] == bits for r in stats["layers"])
    # Checked on held-out calibration samples: the written float model in torch and in onnxruntime.
    assert stats["check_samples"] == 128 and "samples 256-383" in stats["check_data"]
    assert stats["torch_vs_onnxruntime_sqnr_db"] > 60
    assert abs(stats["top1_torch"] - stats["top1_onnxruntime"]) <= 0.1


def test_stored_codes_are_exactly_the_searched_ones_up_to_bn_sign() -> None:
    pipeline = "infer-shapes,fold-constants,slb{bits=2,epochs=1,batch-size=64,check-samples=0}"
    trained = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False).model
    # The pass writes each weight as its codes' values: at 2 bits (ternary) the code is the sign.
    searched = {name: np.sign(trained.graph.initializers[name].const_value.numpy()).astype(np.int64) for name in ("w0", "w1", "wf")}
    full = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline.replace("check-samples=0}", "check-samples=0}," + TAIL), verify=False)
    stored = _weight_codes(full.model)
    # conv1's BN has a negative scale in channel 2: that channel's codes are negated by the fold.
    sign = np.ones((8, 1, 1, 1), np.int64)
    sign[2] = -1
    np.testing.assert_array_equal(stored["conv1"], searched["w1"] * sign)
    np.testing.assert_array_equal(stored["conv0"], searched["w0"])
    np.testing.assert_array_equal(stored["fc"], searched["wf"])


def test_first_and_last_at_eight_bits_train_float_and_are_rounded_by_insert_qdq() -> None:
    pipeline = f"infer-shapes,fold-constants,slb{{bits=2,first-last-bits=8,epochs=1,check-samples=0}},{TAIL}"
    result = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    stored = _weight_codes(result.model)
    assert set(np.unique(stored["conv1"])) <= {-1, 0, 1}
    assert np.abs(stored["conv0"]).max() > 7 and np.abs(stored["fc"]).max() > 7
    assert _stats(result)["float_trained_layers"] == 2


@pytest.mark.parametrize("chooser", ["learn-bits{budget=bits=3,epochs=1,check-samples=0}",
                                     "assign-precision{budget=bits=3}"])
def test_bits_zero_trains_at_the_widths_an_earlier_pass_chose(chooser: str) -> None:
    pipeline = f"infer-shapes,fold-constants,{chooser},slb{{bits=0,epochs=1,check-samples=0}},{TAIL}"
    result = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    first = next(p.stats for p in result.report.passes if p.name == chooser.split("{")[0])
    widths = first.get("widths") or {row["node"]: row["bits"] for row in first["layers"].values()}
    stats = _stats(result)
    assert stats["bits"] == "chosen" and stats["widths"] == widths
    stored = _weight_codes(result.model)
    for node, bits in widths.items():
        # Searched widths hold their symmetric codes; wider ones are rounded by insert-qdq.
        top = 2 ** (bits - 1) - 1
        assert np.abs(stored[node]).max() <= (top if bits <= 4 else 127), node
    assert set(stats["searched_widths"]) == {b for b in widths.values() if b <= 4}


def test_refusals() -> None:
    calib = _calib(64)
    with pytest.raises(QCError, match="5-bit|option 'bits'"):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline="slb{bits=5}", verify=False)
    with pytest.raises(QCError, match="before calibrate and insert-qdq"):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline="fold-batchnorm,calibrate,insert-qdq,slb{bits=2}", verify=False)
    with pytest.raises(QCError, match="activations are not allowed"):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline="slb{bits=2,activation-bits=3}", verify=False)
    with pytest.raises(QCError, match="bits=0 trains at the widths an earlier pass chose, but no earlier pass chose any"):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline="slb{bits=0}", verify=False)
    with pytest.raises(QCError, match="slb trains on data"):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", pipeline="slb{bits=2}", verify=False)


def test_activation_bits_reach_insert_qdq() -> None:
    pipeline = f"infer-shapes,fold-constants,slb{{bits=2,epochs=1,activation-bits=4,check-samples=0}},{TAIL}"
    result = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    assert any(n.op_type == "Clip" for n in result.model.graph)  # 4-bit activations: Q -> Clip -> DQ


def test_an_op_the_torch_executor_cannot_run_is_named() -> None:
    from onnx import helper

    from tests.helpers import make_model, tensor_info

    base = small_bn_cnn()
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Hardmax", ["c0"], ["h"], name="odd_one", axis=1),
        helper.make_node("GlobalAveragePool", ["h"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["logits"], name="flatten"),
    ]
    model = make_model(nodes, [tensor_info("input", [None, 3, 8, 8])], [tensor_info("logits", [None, 8])], {"w0": base.graph.initializers["w0"].const_value.numpy()})
    calib = DataSource({"input": rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)})
    with pytest.raises(QCError, match="Hardmax is not supported by the torch executor") as info:
        qcompiler.compile(model, "ort-cpu", calibration=calib, pipeline="slb{bits=2,check-samples=0}", verify=False)
    assert info.value.node == "odd_one"


def test_insert_qdq_keeps_what_training_found() -> None:
    """The shipped model computes what slb trained (8-bit activations aside): bias correction
    must not pull the trained weights back towards the float model's."""
    from qcompiler.quant.uniform import sqnr_db

    calib = _calib()
    trained = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline="infer-shapes,fold-constants,slb{bits=2,epochs=2,check-samples=0}", verify=False).model
    full = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline=f"infer-shapes,fold-constants,slb{{bits=2,epochs=2,check-samples=0}},{TAIL}", verify=False).model
    x = {"input": np.random.default_rng(9).normal(0, 1, (64, 3, 8, 8)).astype(np.float32)}
    assert sqnr_db(run(trained, x)[0], run(full, x)[0]) > 20


def test_checkpoint_resumes_and_a_foreign_one_is_refused(tmp_path) -> None:
    calib = _calib(128)
    ckpt = tmp_path / "ckpt"
    first = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, verify=False,
                              pipeline=f"slb{{bits=2,epochs=2,check-samples=0,checkpoint-dir={ckpt}}}")
    assert (ckpt / "slb.pt").is_file()
    resumed = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, verify=False,
                                pipeline=f"slb{{bits=2,epochs=2,check-samples=0,resume={ckpt}}}")
    assert _stats(resumed)["resumed_from_epoch"] == 2 and _stats(resumed)["epochs_completed"] == 2
    # Nothing left to train: the resumed run writes the same weights.
    for name in ("w0", "w1", "wf"):
        np.testing.assert_array_equal(first.model.graph.initializers[name].const_value.numpy(), resumed.model.graph.initializers[name].const_value.numpy())
    # A checkpoint of 3-level (2-bit) logits cannot continue a 4-bit search: refused, naming why.
    with pytest.raises(QCError, match=r"was written for .*shape \[3, 8, 3, 3, 3\].*\[15, 8, 3, 3, 3\]"):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, verify=False, pipeline=f"slb{{bits=4,epochs=2,check-samples=0,resume={ckpt}}}")


def test_full_low_bit_range_trains_four_levels_and_qat_keeps_a_negated_channel(tmp_path) -> None:
    """A target with ``low_bit_range = "full"``: 2-bit codes are -2..1 (four levels, not ternary);
    a channel whose BatchNormalization scale is negative holds them negated after fold-batchnorm
    (-1..2), and qat trains it there instead of clipping its 2s to 1."""
    from qcompiler.quant.weights import weight_qrange
    from qcompiler.targets.spec import load_target

    target = tmp_path / "full.toml"
    target.write_text('extends = "ort-cpu"\n[weights]\nlow_bit_range = "full"\n')
    assert weight_qrange(load_target(str(target)).weights, 2) == (-2, 1)
    calib = _calib()
    slb = qcompiler.compile(small_bn_cnn(), str(target), calibration=calib, verify=False,
                            pipeline=f"infer-shapes,fold-constants,slb{{bits=2,epochs=2,batch-size=32,check-samples=0}},{TAIL}").model
    after_qat = qcompiler.compile(small_bn_cnn(), str(target), calibration=calib, verify=False,
                                  pipeline=f"infer-shapes,fold-constants,slb{{bits=2,epochs=2,batch-size=32,check-samples=0}},{TAIL},qat{{epochs=1,batch-size=32,check-samples=0}}").model
    for model in (slb, after_qat):
        stored = _weight_codes(model)
        every = np.concatenate([q.reshape(-1) for q in stored.values()])
        assert set(np.unique(every)) <= {-2, -1, 0, 1, 2} and -2 in every
        negated = stored["conv1"][2]  # bn1's channel 2 has a negative scale
        assert negated.min() >= -1 and negated.max() <= 2
        for c in set(range(8)) - {2}:
            assert stored["conv1"][c].min() >= -2 and stored["conv1"][c].max() <= 1
    assert 2 in _weight_codes(after_qat)["conv1"][2], "qat clipped the negated channel's top code"
