"""finetune-codebook: train the shared centres of clustered weights, indices fixed (Choi et al. 2017).

The network runs in torch (`TorchGraph`) with every codebook as a parameter, so a centre's
gradient is the sum of its members' weight gradients. The paper averages them per cluster; Adam,
used here because it needs no per-model learning-rate tuning, normalises each centre's step by its
own gradient history, which makes the sum and the average the same update. The pruned zero slot
gets no gradient and never moves. Loss: cross-entropy with labels, else KL to the float network's outputs
(the weights cluster-weights replaced, substituted back for the lookup).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.codebook import FLOAT_WEIGHTS_FACT, ZERO_INDEX_KEY
from qcompiler.errors import QCError
from qcompiler.hessian import LossName, choose_loss
from qcompiler.ir import SOURCE_KEY, is_float_tensor
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass


@register_pass
class FinetuneCodebook(Pass):
    """Fine-tune the centres of clustered weights by gradient descent (cluster-averaged gradients)."""

    name = "finetune-codebook"

    @dataclass(frozen=True)
    class Options:
        #: Passes over the data.
        epochs: int = 3
        batch_size: int = 64
        #: Adam learning rate on the centres.
        lr: float = 1e-4
        loss: LossName = "auto"

        def __post_init__(self) -> None:
            if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
                raise ValueError("options 'epochs' and 'batch-size' must be >= 1 and 'lr' > 0")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        import torch

        from qcompiler.torch_exec import TorchGraph

        if ctx.data is None:
            raise QCError("fine-tuning needs data: pass --calib FILE.npz", pass_name=self.name)
        lookups = [n for n in model.graph if n.op_type == "Gather" and ZERO_INDEX_KEY in n.metadata_props]
        if not lookups:
            raise QCError("no clustered weights to fine-tune: run cluster-weights first", pass_name=self.name)
        out_value = model.graph.outputs[0]
        if not is_float_tensor(out_value):
            raise QCError(f"the loss cannot be defined: output '{out_value.name}' is not float", pass_name=self.name)
        codebooks = sorted({n.inputs[0].name for n in lookups})
        graph = TorchGraph(model, trainable=codebooks)
        params = graph.named_weights()
        frozen = {name: np.zeros(len(params[name]), dtype=bool) for name in codebooks}
        for node in lookups:
            zero = node.metadata_props[ZERO_INDEX_KEY]
            if zero:
                frozen[node.inputs[0].name][int(zero)] = True
        for name, p in params.items():
            keep = torch.from_numpy(~frozen[name]).to(p.dtype)
            p.register_hook(lambda g, keep=keep: g * keep)
        float_weights = ctx.facts.get(FLOAT_WEIGHTS_FACT, {})
        overrides = {n.outputs[0].name: torch.from_numpy(np.asarray(float_weights[n.metadata_props[SOURCE_KEY]], np.float32))
                     for n in lookups if n.metadata_props.get(SOURCE_KEY) in float_weights}
        labels = ctx.data.labels
        first = next(ctx.data.batches(self.options.batch_size))
        loss_name = choose_loss(self.options.loss, tuple(graph.run(first, [out_value.name])[out_value.name].shape), labels is not None)
        if loss_name in ("kl", "mse") and len(overrides) < len(lookups):
            raise QCError("the label-free loss needs the float weights from cluster-weights in this same pipeline (or data with labels)", pass_name=self.name, option="loss")
        optimizer = torch.optim.Adam(list(params.values()), lr=self.options.lr)
        step = ctx.data.fixed_batch or self.options.batch_size
        batches = ctx.data.usable_samples // step or 1
        losses = []
        with ctx.progress("fine-tuning centres", self.options.epochs * batches) as progress:
            for _ in range(self.options.epochs):
                epoch_loss = 0.0
                for i, batch in enumerate(ctx.data.batches(self.options.batch_size)):
                    out = graph.run(batch, [out_value.name])[out_value.name]
                    if loss_name == "cross-entropy":
                        target = torch.from_numpy(np.asarray(labels[i * step : i * step + len(out)], dtype=np.int64))
                        loss = torch.nn.functional.cross_entropy(out, target)
                    else:
                        with torch.no_grad():
                            reference = graph.run(batch, [out_value.name], overrides=overrides)[out_value.name]
                        if loss_name == "kl":
                            loss = torch.nn.functional.kl_div(torch.log_softmax(out, -1), torch.log_softmax(reference, -1), log_target=True, reduction="batchmean")
                        else:
                            loss = 0.5 * torch.mean((out - reference) ** 2)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    epoch_loss += loss.item()
                    progress.advance()
                losses.append(epoch_loss / batches)
        moved = {}
        for name, p in params.items():
            values = p.detach().numpy().astype(np.float32)
            values[frozen[name]] = 0.0  # exact zeros, whatever rounding the optimizer did
            before = model.graph.initializers[name].const_value.numpy()
            moved[name] = float(np.max(np.abs(values - before)))
            model.graph.initializers[name].const_value = ir.tensor(values, name=name)
        return PassResult(model, True, {"loss": loss_name, "epochs": self.options.epochs, "loss_per_epoch": [round(v, 5) for v in losses], "max_centre_move": moved})
