"""A pass of your own, outside the package: clip weight outliers before quantization.

Per-channel int8 scales are set by each channel's largest weight; a few outliers stretch the grid
for everyone else. Clipping at mean +- k standard deviations trades a little error on the outliers
for finer steps everywhere else.

Run it without touching qcompiler:

    qc compile models/cifar10_resnet20.onnx --calib models/cifar10_calib.npz -o out-clip \\
        --plugin examples/custom_pass.py \\
        --pipeline "infer-shapes,fold-constants,fold-batchnorm,clip-weights{sigmas=4},calibrate,insert-qdq"

or make it permanent for an installed package of yours with an entry point:

    [project.entry-points."qcompiler.passes"]
    clip-weights = "my_package.custom_pass:ClipWeights"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler import Pass, PassContext, PassResult, register_pass
from qcompiler.op_roles import input_roles


@register_pass
class ClipWeights(Pass):
    """Clip each output channel of Conv/Gemm/MatMul weights to mean +- k standard deviations."""

    name = "clip-weights"

    @dataclass(frozen=True)
    class Options:
        sigmas: float = 4.0

        def __post_init__(self) -> None:
            if self.sigmas <= 0:
                raise ValueError(f"option 'sigmas' must be positive, got {self.sigmas}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        clipped = 0
        for node in model.graph:
            roles = input_roles(node)
            if roles.weight is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            weight = node.inputs[roles.weight]
            if weight is None or weight.const_value is None:
                continue
            w = weight.const_value.numpy()
            axis = roles.weight_axis or 0
            moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            mean = moved.mean(axis=1, keepdims=True)
            bound = self.options.sigmas * moved.std(axis=1, keepdims=True)
            new = np.clip(moved, mean - bound, mean + bound)
            clipped += int(np.count_nonzero(new != moved))
            new_w = np.moveaxis(new.reshape(np.moveaxis(w, axis, 0).shape), 0, axis).astype(w.dtype)
            weight.const_value = ir.tensor(new_w, name=weight.name)
        return PassResult(model, clipped > 0, {"clipped_weights": clipped})
