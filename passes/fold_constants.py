"""fold-constants: evaluate subgraphs whose inputs are all constant and drop what becomes unused."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass


@register_pass
class FoldConstants(Pass):
    """Fold constant subgraphs (shape arithmetic, Constant nodes) into initializers."""

    name = "fold-constants"
    tolerance = 1e-6

    @dataclass(frozen=True)
    class Options:
        #: Largest tensor (elements) a folded node may produce; bigger results stay computed.
        max_elements: int = 1 << 20

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        limit = self.options.max_elements

        def should_fold(node: ir.Node) -> bool | None:
            # onnxscript keeps ConstantOfShape to avoid growing models; small ones (pad vectors
            # computed by exporters) block quantization of everything downstream, so fold those.
            if node.op_type == "ConstantOfShape" and node.inputs and node.inputs[0] is not None:
                shape = node.inputs[0].const_value
                if shape is not None and int(np.prod(shape.numpy())) <= limit:
                    return True
            return None

        before = model.graph.num_nodes()
        folded = onnxscript.optimizer.fold_constants(
            model, onnx_shape_inference=True, output_size_limit=limit, should_fold=should_fold
        )
        RemoveUnusedNodesPass()(model)
        removed = before - model.graph.num_nodes()
        return PassResult(model, folded.modified or removed > 0, {"nodes_removed": removed})
