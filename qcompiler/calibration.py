"""`CalibrationRanges`: observed value ranges of every float activation, streamed through onnxruntime.

The model runs batch by batch with every float activation exposed as an output; each tensor feeds a
streaming observer (fixed-size histogram), so memory stays flat however many samples are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import Analysis
from qcompiler.errors import QCError
from qcompiler.ir import is_float_tensor, to_proto
from qcompiler.pass_manager import PassContext
from qcompiler.quant.observers import Observer, make_observer
from qcompiler.runtime import make_session, with_extra_outputs, run_checked

#: The facts key under which the `calibrate` pass records the analysis later passes should use.
CALIBRATION_FACT = "calibration"


def activation_values(model: ir.Model) -> list[ir.Value]:
    """Float tensors computed at run time (graph inputs and node outputs, not constants)."""
    values = [v for v in model.graph.inputs if is_float_tensor(v) and v.name not in model.graph.initializers]
    for node in model.graph:
        if node.op_type == "Constant":
            continue
        values.extend(v for v in node.outputs if is_float_tensor(v) and v.const_value is None and v.name)
    return values


#: All activations of one calibration batch are in memory at once: bound them, whatever the model.
ACTIVATION_BUDGET_BYTES = 1 << 30


def _bytes_per_sample(values: list[ir.Value]) -> int:
    """Activation bytes one sample produces, from the values' shapes (unknown dims count as 1)."""
    total = 0
    for v in values:
        dims = list(v.shape) if v.shape is not None else []
        per_sample = 1
        for d in dims[1:]:
            per_sample *= d if isinstance(d, int) else 1
        total += per_sample * int(v.dtype.itemsize if v.dtype is not None else 4)
    return total


@dataclass(frozen=True)
class CalibrationRanges(Analysis[dict[str, Observer]]):
    """Observers (by value name) that saw every float activation on the calibration data."""

    name = "calibration-ranges"
    method: str = "mse"
    percentile: float = 99.99
    bins: int = 2048
    batch_size: int = 32

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[str, Observer]:
        if ctx.data is None:
            raise QCError("calibration needs data: pass --calib FILE.npz (or calibration= in the Python API)", pass_name="calibrate")
        values = activation_values(model)
        names = [v.name for v in values]
        graph_inputs = {v.name for v in model.graph.inputs}
        observers = {n: make_observer(self.method, percentile=self.percentile, bins=self.bins) for n in names}
        proto = with_extra_outputs(to_proto(model), [n for n in names if n not in graph_inputs])
        # Basic optimizations only: fusions would not change exposed tensors but cost compile time.
        session = make_session(proto, optimize=False, what="model being calibrated")
        output_names = [o.name for o in session.get_outputs()]
        wanted = [n for n in output_names if n in observers]
        batch_size = min(self.batch_size, max(1, ACTIVATION_BUDGET_BYTES // max(1, _bytes_per_sample(values))))
        total = len(range(0, ctx.data.usable_samples, ctx.data.fixed_batch or batch_size))
        with ctx.progress("calibrating", total) as progress:
            for batch in ctx.data.batches(batch_size):
                results = run_checked(session, wanted, batch, what="model being calibrated", data=ctx.data.origin)
                for name, array in zip(wanted, results):
                    try:
                        observers[name].update(np.asarray(array))
                    except ValueError as exc:  # Inf in a tensor: the float model overflows on this data
                        raise QCError(f"tensor '{name}' is infinite on the calibration data ({ctx.data.origin}): the float model itself overflows there "
                                      f"({exc}); a range cannot hold it: check the data's scale, or run this part of the model in float32 without quantizing it",
                                      pass_name="calibrate") from None
                for name in graph_inputs & observers.keys():
                    observers[name].update(batch[name])
                progress.advance()
        return observers
