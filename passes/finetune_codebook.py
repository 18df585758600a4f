"""finetune-codebook: train the shared centres of clustered weights, indices fixed (Choi et al. 2017).

The network runs in torch (`TorchGraph`) with every codebook as a parameter, so a centre's
gradient is the sum of its members' weight gradients. The paper averages them per cluster; Adam,
used here because it needs no per-model learning-rate tuning, normalises each centre's step by its
own gradient history, which makes the sum and the average the same update. The pruned zero slot
gets no gradient and never moves. A uniform grid (``centres=grid``, stored as DequantizeLinear)
trains its one step instead, so it stays a grid and keeps its standard ONNX form. Loss: cross-entropy with labels, else KL to the float network's outputs
(the weights cluster-weights replaced, substituted back for the lookup).

Options are finetune-weights' (`TrainSettings`): with ``optimizer=sgd`` the sum of the members'
gradients is no longer normalised away, so a large cluster moves faster than under Adam (lower
``lr`` accordingly). ``max-minutes``, ``checkpoint-dir``/``resume``, ``schedule`` and
``warmup-steps`` work as there.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.codebook import FLOAT_WEIGHTS_FACT, ZERO_INDEX_KEY
from qcompiler.errors import QCError
from qcompiler.ir import SOURCE_KEY
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass
from qcompiler.training import TrainSettings, fit, output_value, resolve_loss, write_back


@register_pass
class FinetuneCodebook(Pass):
    """Fine-tune the centres of clustered weights by gradient descent (cluster-averaged gradients)."""

    name = "finetune-codebook"

    Options = TrainSettings

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        import torch

        from qcompiler.torch_exec import TorchGraph

        if ctx.data is None:
            raise QCError("fine-tuning needs data: pass --calib FILE.npz", pass_name=self.name)
        lookups = [n for n in model.graph if n.op_type in ("Gather", "DequantizeLinear") and ZERO_INDEX_KEY in n.metadata_props]
        if not lookups:
            raise QCError("no clustered weights to fine-tune: run cluster-weights first", pass_name=self.name)
        out_value = output_value(model, self.name)
        # A Gather's centres each train; a grid (DequantizeLinear) trains its step, so it stays a grid.
        trained = sorted({(n.inputs[0] if n.op_type == "Gather" else n.inputs[1]).name for n in lookups})
        graph = TorchGraph(model, trainable=trained)
        params = graph.named_weights()
        frozen = {}
        for node in lookups:
            zero = node.metadata_props[ZERO_INDEX_KEY]
            if node.op_type == "Gather" and zero:
                name = node.inputs[0].name
                frozen.setdefault(name, np.zeros(len(params[name]), dtype=bool))[int(zero)] = True
        float_weights = ctx.facts.get(FLOAT_WEIGHTS_FACT, {})
        # The float network: each lookup replaced by the weight it stands for, and any other
        # tensor an earlier pass retrained (finetune-weights' biases) back at its float value.
        overrides = {n.outputs[0].name: torch.from_numpy(np.asarray(float_weights[n.metadata_props[SOURCE_KEY]], np.float32))
                     for n in lookups if n.metadata_props.get(SOURCE_KEY) in float_weights}
        overrides.update({name: torch.from_numpy(np.asarray(v, np.float32)) for name, v in float_weights.items() if name in model.graph.initializers})
        loss_name = resolve_loss(graph, ctx.data, out_value.name, self.options.loss, self.options.batch_size, self.name)
        if loss_name in ("kl", "mse") and len({n.outputs[0].name for n in lookups} & set(overrides)) < len(lookups):
            raise QCError("the label-free loss needs the float weights from cluster-weights in this same pipeline (or data with labels)", pass_name=self.name, option="loss")
        trained = fit(graph, ctx, params, frozen, loss_name=loss_name, out_name=out_value.name, reference_overrides=overrides, settings=self.options, pass_name=self.name, label="fine-tuning centres")
        moved = write_back(model, params)
        return PassResult(model, True, {"loss": loss_name, "epochs": self.options.epochs, "loss_per_epoch": [round(v, 5) for v in trained.losses],
                                        "max_centre_move": moved, **trained.stats()})
