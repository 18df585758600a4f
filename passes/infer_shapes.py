"""infer-shapes: annotate every value with its shape and element type (ONNX shape inference)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass


@register_pass
class InferShapes(Pass):
    """Annotate values with shapes and dtypes from ONNX shape inference (changes no computation)."""

    name = "infer-shapes"
    preserves = "all"  # only annotations change; no analysis depends on them being absent
    tolerance = 0.0

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        result = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        return PassResult(result.model, result.modified)
