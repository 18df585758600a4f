"""CalibrationRanges: ranges equal the tensors' true extremes (minmax) and memory does not grow."""

from __future__ import annotations

import numpy as np

from qcompiler.calibration import CalibrationRanges, activation_values
from qcompiler.data import DataSource
from qcompiler.ir import load_model, to_proto
from qcompiler.pass_manager import PassContext
from qcompiler.runtime import make_session, with_extra_outputs
from qcompiler.targets.spec import load_target


def test_minmax_ranges_are_the_exact_extremes_of_every_activation(bundled_model, bundled_calib) -> None:
    model = load_model(bundled_model)
    x = np.load(bundled_calib)["input"][:40]
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"input": x}))
    observers = ctx.analyses.get(CalibrationRanges(method="minmax", batch_size=16), model, ctx)
    names = [v.name for v in activation_values(model) if v.name != "input"]
    assert set(names) <= set(observers)
    outputs = make_session(with_extra_outputs(to_proto(model), names), optimize=False).run(names, {"input": x})
    for name, array in zip(names, outputs):
        lo, hi = observers[name].range(levels=256, symmetric=False)
        assert lo == min(float(array.min()), 0.0) and hi == max(float(array.max()), 0.0)


def test_histogram_memory_does_not_grow_with_samples(bundled_model, bundled_calib) -> None:
    model = load_model(bundled_model)
    x = np.load(bundled_calib)["input"]
    sizes = []
    for count in (32, 256):
        ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"input": x[:count]}))
        observers = ctx.analyses.get(CalibrationRanges(method="percentile"), model, ctx)
        sizes.append(sum(o.state_bytes() for o in observers.values()))
    assert sizes[0] == sizes[1]
