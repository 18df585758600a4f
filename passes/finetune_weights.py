"""finetune-weights: retrain the float weights and biases, pruned weights held at zero (Han et al.).

Pruning 70-90 % of a network's weights by magnitude costs tens of points of accuracy until the
surviving weights are retrained around the holes; Choi et al.'s compression ratios are all of
pruned *and retrained* networks. This pass trains every float32 weight and bias of the
Conv/ConvTranspose/Gemm/MatMul nodes, and BatchNorm's scale and shift, through the torch executor, the masks of `prune-magnitude`
holding the pruned weights at exactly zero, so `cluster-weights` then clusters a network that is
accurate again. Loss: cross-entropy with labels, else KL (MSE for non-classifiers) to the network
before any pass of this pipeline changed its weights.

Options (`TrainSettings`, shared with finetune-codebook): ``epochs``, ``batch-size``, ``lr``,
``loss``, ``augment``; ``optimizer=adam|sgd`` with ``momentum`` and ``weight-decay``;
``schedule=cosine|step|constant`` after ``warmup-steps``; ``max-minutes`` (a time budget: stops
between steps and keeps the best epoch's weights); ``checkpoint-dir`` and ``resume`` (a checkpoint
after every epoch, and continuing from one). The stats add seconds per epoch, images per second,
peak memory, the final learning rate and whether the run stopped early.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.codebook import FLOAT_WEIGHTS_FACT, PRUNED_FACT
from qcompiler.errors import QCError
from qcompiler.hessian import quantizable_weights
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass
from qcompiler.training import TrainSettings, fit, output_value, resolve_loss, write_back


def trainable_tensors(model: ir.Model) -> list[str]:
    """The float32 initializers retraining moves (each shared tensor once): the weights and biases
    of the weighted ops, and the scale and shift of every BatchNormalization.

    BatchNorm's scale and shift are a per-channel gain and offset after each pruned convolution:
    cheap to store, and the most direct way to restore the size of a channel that lost most of its
    weights. Its running mean and variance stay as they are (inference-mode normalisation).
    """
    graph = model.graph
    names = set(quantizable_weights(model))
    for node in graph:
        roles = input_roles(node)
        extra = []
        if roles.weight is not None and roles.bias is not None and roles.bias < len(node.inputs):
            extra.append(node.inputs[roles.bias])
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            extra.extend(node.inputs[1:3])
        names.update(v.name for v in extra if v is not None and v.name in graph.initializers)
    return sorted(n for n in names if graph.initializers[n].dtype == ir.DataType.FLOAT)


@register_pass
class FinetuneWeights(Pass):
    """Retrain float weights and biases by gradient descent; pruned weights stay exactly zero."""

    name = "finetune-weights"

    Options = TrainSettings

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        import torch

        from qcompiler.torch_exec import TorchGraph

        if ctx.data is None:
            raise QCError("retraining needs data: pass --calib FILE.npz (with 'labels' for a supervised loss)", pass_name=self.name)
        out_value = output_value(model, self.name)
        names = trainable_tensors(model)
        if not names:
            raise QCError("the model has no float32 Conv/Gemm/MatMul weights to retrain", pass_name=self.name)
        graph = TorchGraph(model, trainable=names)
        params = graph.named_weights()
        masks = ctx.facts.get(PRUNED_FACT, {})
        held_zero = {name: np.asarray(masks[name], bool) for name in names if name in masks}
        # The first float value of each tensor is the reference: later fine-tuning passes (and
        # this one's label-free loss) compare against the network before pruning.
        float_weights = ctx.facts.setdefault(FLOAT_WEIGHTS_FACT, {})
        for name in names:
            float_weights.setdefault(name, model.graph.initializers[name].const_value.numpy().copy())
        overrides = {name: torch.from_numpy(np.asarray(float_weights[name], np.float32)) for name in names}
        loss_name = resolve_loss(graph, ctx.data, out_value.name, self.options.loss, self.options.batch_size, self.name)
        trained = fit(graph, ctx, params, held_zero, loss_name=loss_name, out_name=out_value.name, reference_overrides=overrides, settings=self.options, pass_name=self.name, label="retraining weights", channels_last=True)
        moved = max(write_back(model, params).values())
        held = int(sum(m.sum() for m in held_zero.values()))
        return PassResult(model, True, {"loss": loss_name, "epochs": self.options.epochs, "loss_per_epoch": [round(v, 5) for v in trained.losses],
                                        "tensors": len(names), "held_at_zero": held, "max_move": moved, **trained.stats()})
