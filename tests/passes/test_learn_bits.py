"""learn-bits on a small Conv-BN network: widths from the target's allowed set, within the
budget, lowered like assign-precision's (codes limited to their width after fold-batchnorm)."""

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


def _stats(result) -> dict:
    return next(p.stats for p in result.report.passes if p.name == "learn-bits")


def _stored(model) -> dict[str, np.ndarray]:
    return {n.name: n.inputs[1].producer().inputs[0].const_value.numpy().astype(np.int64) for n in model.graph if n.op_type in ("Conv", "Gemm")}


@pytest.mark.parametrize("method", ["uhlich", "bitnet"])
def test_widths_keep_to_the_budget_and_are_what_the_graph_stores(method: str) -> None:
    pipeline = f"infer-shapes,fold-constants,learn-bits{{budget=bits=3,method={method},initial-bits=4,epochs=2,batch-size=32,check-samples=128}},{TAIL}"
    result = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    stats = _stats(result)
    assert stats["average_bits"] <= 3.0 + 1e-9 and stats["cost"] <= stats["limit"]
    assert set(stats["widths"].values()) <= {2, 3, 4, 5, 6, 8}
    stored = _stored(result.model)
    for node, bits in stats["widths"].items():
        assert np.abs(stored[node]).max() <= 2 ** (bits - 1) - 1, node
    assert stats["batchnorm_reestimated"] == 2
    # Widths are fixed (and kept to the budget) three quarters in; the last steps train at them,
    # so nothing needs lowering after training.
    assert stats["widths_fixed_at_step"] == int(0.75 * stats["steps"]) and stats["lowered_after_training"] == []
    assert stats["torch_vs_onnxruntime_sqnr_db"] > 60 and abs(stats["top1_torch"] - stats["top1_onnxruntime"]) <= 0.1
    if method == "bitnet":
        assert sum(stats["bitnet_moves"].values()) > 0


def test_size_and_bops_budgets() -> None:
    for budget in ("size=0.4", "bops=0.3"):
        pipeline = f"infer-shapes,fold-constants,learn-bits{{budget={budget},epochs=1,check-samples=0}},{TAIL}"
        stats = _stats(qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False))
        assert stats["cost"] <= stats["limit"], budget
        assert stats["unit"] == ("bit-ops" if budget.startswith("bops") else "weight bits")


def test_first_and_last_fixed() -> None:
    pipeline = f"infer-shapes,fold-constants,learn-bits{{budget=bits=6,first-last-bits=8,epochs=1,check-samples=0}},{TAIL}"
    stats = _stats(qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False))
    assert stats["widths"]["conv0"] == 8 and stats["widths"]["fc"] == 8


def test_bad_budgets_name_the_option() -> None:
    calib = _calib(64)
    with pytest.raises(QCError, match="below what the narrowest widths cost") as info:
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline="infer-shapes,learn-bits{budget=bits=1.5}", verify=False)
    assert info.value.option == "budget"
    with pytest.raises(QCError, match="is not a budget"):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=calib, pipeline="infer-shapes,learn-bits{budget=latency=0.5}", verify=False)


def test_the_result_validates_against_the_target() -> None:
    """Widths learned here go through assign-precision's lowering: qc validate finds nothing."""
    from qcompiler.targets.spec import load_target
    from qcompiler.validate import validate

    pipeline = f"infer-shapes,fold-constants,learn-bits{{budget=bits=3,epochs=1,check-samples=0}},{TAIL}"
    model = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False).model
    assert validate(model, load_target("ort-cpu")) == []


def test_a_run_resumed_after_the_widths_were_fixed_keeps_them(tmp_path) -> None:
    """The widths fixed at freeze-at travel in the checkpoint: resuming after that step ends as the
    uninterrupted run does, instead of deriving new widths from weights trained on at the old ones."""
    from contextlib import contextmanager

    folder = tmp_path / "ck"
    # 256 training samples / 32 = 8 steps an epoch; the widths are fixed at step 4 of 16.
    options = "budget=bits=3,initial-bits=4,epochs=2,batch-size=32,check-samples=128,freeze-at=0.25"
    pipe = f"infer-shapes,fold-constants,learn-bits{{{options},checkpoint-dir={folder}}},{TAIL}"
    straight = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipe, verify=False)

    class Interrupt:
        steps = 0

        @contextmanager
        def __call__(self, label, total):
            outer = self

            class Bar:
                def advance(self, n: int = 1) -> None:
                    outer.steps += n
                    if outer.steps == 11:  # in the second epoch: the checkpoint holds the first
                        raise KeyboardInterrupt

            yield Bar()

    folder2 = tmp_path / "ck2"
    pipe2 = pipe.replace(str(folder), str(folder2))
    with pytest.raises(KeyboardInterrupt):
        qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipe2, verify=False, progress=Interrupt())
    resumed = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipe2.replace("}", f",resume={folder2}}}", 1), verify=False)
    a, b = _stats(straight), _stats(resumed)
    assert b["resumed_from_epoch"] == 1 and b["widths_fixed_at_step"] == a["widths_fixed_at_step"] == 4
    assert a["widths"] == b["widths"]
    for node, codes in _stored(straight.model).items():
        np.testing.assert_array_equal(_stored(resumed.model)[node], codes, err_msg=node)


def test_keep_weights_hands_on_only_the_widths() -> None:
    model = small_bn_cnn()
    before = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    pipeline = "infer-shapes,fold-constants,learn-bits{budget=bits=3,epochs=1,keep-weights=true,check-samples=0}"
    result = qcompiler.compile(model, "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    stats = _stats(result)
    assert stats["kept_weights"] and stats["average_bits"] <= 3.0 + 1e-9 and "layers" not in stats
    for name, value in result.model.graph.initializers.items():
        if name in before:
            np.testing.assert_array_equal(value.const_value.numpy(), before[name], err_msg=name)
    # The widths reach insert-qdq (plain rounding at them) like assign-precision's.
    lowered = qcompiler.compile(small_bn_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline.replace(",check-samples=0}", ",check-samples=0}," + TAIL), verify=False)
    for node, codes in _stored(lowered.model).items():
        bits = _stats(lowered)["widths"][node]
        assert np.abs(codes).max() <= 2 ** (bits - 1) - 1, node


def test_full_low_bit_range_learns_and_stores_the_extra_negative_code(tmp_path) -> None:
    """On a target with ``low_bit_range = "full"`` the learned quantizer uses all 2^b codes of a
    width (-2^(b-1) included, mirrored in a channel fold-batchnorm negated); the model validates."""
    from qcompiler.targets.spec import load_target
    from qcompiler.validate import validate

    target = tmp_path / "full.toml"
    target.write_text('extends = "ort-cpu"\n[weights]\nlow_bit_range = "full"\n')
    pipeline = f"infer-shapes,fold-constants,learn-bits{{budget=bits=3,initial-bits=3,epochs=1,batch-size=32,check-samples=128}},{TAIL}"
    result = qcompiler.compile(small_bn_cnn(), str(target), calibration=_calib(), pipeline=pipeline, verify=False)
    stats = _stats(result)
    stored = _stored(result.model)
    reached = False
    for node, bits in stats["widths"].items():
        top = 2 ** (bits - 1) - 1
        for c, channel in enumerate(stored[node]):
            lo, hi = (-top, top + 1) if (node, c) == ("conv1", 2) else (-top - 1, top)  # bn1's channel 2: negative scale
            assert channel.min() >= lo and channel.max() <= hi, (node, c)
            reached |= bits < 8 and (channel.min() == -top - 1 or channel.max() == top + 1)
    assert reached
    assert abs(stats["top1_torch"] - stats["top1_onnxruntime"]) <= 0.1
    assert validate(result.model, load_target(str(target))) == []
