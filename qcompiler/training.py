"""Gradient training of chosen initializers through the torch executor, for the fine-tuning passes.

One loop serves every pass that retrains part of a network (`finetune-weights` after pruning,
`finetune-codebook` after clustering): shuffled batches, Adam with a cosine-decayed learning rate,
cross-entropy with labels or else a label-free loss against the float network's outputs, and
entries held at exactly zero (pruned weights, a codebook's zero slot) however the optimizer rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.augment import AugmentName, augment_batch, image_inputs
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.hessian import LossName, choose_loss
from qcompiler.ir import is_float_tensor
from qcompiler.pass_manager import PassContext


@dataclass(frozen=True)
class TrainSettings:
    """How long and how fast to train: the options of both fine-tuning passes."""

    epochs: int = 3
    batch_size: int = 64
    #: Adam's initial learning rate; it decays to zero along a cosine over all the steps, so the
    #: last steps settle instead of jumping around the minimum (what a fixed rate leaves behind).
    lr: float = 1e-4
    loss: LossName = "auto"
    #: Random shifted crops (and mirror flips) of 4-D image inputs, fresh every epoch: retraining
    #: on the model's own training images otherwise fits what it already knows (see augment.py).
    augment: AugmentName = "none"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("options 'epochs' and 'batch-size' must be >= 1 and 'lr' > 0")


def output_value(model: ir.Model, pass_name: str) -> ir.Value:
    """The graph output the loss is defined on (the first; it must be float)."""
    out = model.graph.outputs[0]
    if not is_float_tensor(out):
        raise QCError(f"the loss cannot be defined: output '{out.name}' is not float", pass_name=pass_name)
    return out


def resolve_loss(graph, data: DataSource, out_name: str, requested: str, batch_size: int, pass_name: str) -> str:
    """The loss `fit` will use: cross-entropy with labels, else KL (classifiers) or MSE."""
    first = graph.run(data.first_batch(batch_size), [out_name])[out_name]
    loss_name = choose_loss(requested, tuple(first.shape), data.labels is not None)
    if loss_name == "cross-entropy" and data.labels is None:
        raise QCError("loss=cross-entropy needs 'labels' in the data file", pass_name=pass_name, option="loss")
    return loss_name


def task_loss(loss_name: str, out, labels: np.ndarray | None, reference):
    """Mean loss of a batch: cross-entropy against ``labels``, or KL / MSE against ``reference``."""
    import torch

    if loss_name == "cross-entropy":
        return torch.nn.functional.cross_entropy(out, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    if loss_name == "kl":
        return torch.nn.functional.kl_div(torch.log_softmax(out, -1), torch.log_softmax(reference, -1), log_target=True, reduction="batchmean")
    # Per sample the squared error summed over its outputs, averaged over the batch.
    return 0.5 * torch.mean(torch.sum((out - reference).reshape(len(out), -1) ** 2, dim=1))


def shuffled_batches(data: DataSource, batch_size: int, rng: np.random.Generator):
    """(inputs, labels) batches in a fresh random order; a fixed batch size drops the remainder."""
    step = data.fixed_batch or batch_size
    order = rng.permutation(data.usable_samples)
    for start in range(0, len(order), step):
        # Sorted within the batch: reads from a memory-mapped .npz stay sequential.
        idx = np.sort(order[start : start + step])
        if data.fixed_batch and len(idx) < step:
            break
        labels = None if data.labels is None else data.labels[idx]
        yield {k: np.ascontiguousarray(a[idx]) for k, a in data.arrays.items()}, labels


def fit(graph, ctx: PassContext, params: Mapping[str, object], held_zero: Mapping[str, np.ndarray], *, loss_name: str, out_name: str,
        reference_overrides: Mapping[str, object], settings: TrainSettings, label: str, pass_name: str) -> list[float]:
    """Train ``params`` (torch parameters of ``graph`` by initializer name) on ``ctx.data``.

    ``held_zero`` maps a parameter name to a boolean mask of entries that get no gradient and are
    reset to exactly 0 after every step. The label-free losses compare against ``graph`` run with
    ``reference_overrides`` (the float values of what is being trained). Returns the mean loss of
    each epoch.
    """
    import torch

    data = ctx.data
    assert data is not None
    if settings.augment != "none" and not image_inputs(data.arrays):
        raise QCError(f"augment={settings.augment} needs an image input (float, shape N x C x H x W with H, W >= 8); "
                      f"inputs here: {', '.join(f'{k} {a.shape}' for k, a in data.arrays.items())}", pass_name=pass_name, option="augment")
    keep = {name: torch.from_numpy(~mask).to(params[name].dtype) for name, mask in held_zero.items() if mask.any()}
    hooks = [params[name].register_hook(lambda g, k=k: g * k) for name, k in keep.items()]
    optimizer = torch.optim.Adam(list(params.values()), lr=settings.lr)
    step = data.fixed_batch or settings.batch_size
    per_epoch = max(data.usable_samples // step, 1)
    total_steps = settings.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total_steps) / total_steps)))
    rng = np.random.default_rng(ctx.seed)
    losses = []
    try:
        with ctx.progress(label, total_steps) as progress:
            for _ in range(settings.epochs):
                epoch_loss, seen = 0.0, 0
                for batch, labels in shuffled_batches(data, settings.batch_size, rng):
                    batch = augment_batch(batch, settings.augment, rng)
                    out = graph.run(batch, [out_name])[out_name]
                    reference = None
                    if loss_name != "cross-entropy":
                        with torch.no_grad():
                            reference = graph.run(batch, [out_name], overrides=reference_overrides)[out_name]
                    loss = task_loss(loss_name, out, labels, reference)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    with torch.no_grad():
                        for name, k in keep.items():
                            params[name].mul_(k)
                    epoch_loss, seen = epoch_loss + loss.item(), seen + 1
                    progress.advance()
                losses.append(epoch_loss / max(seen, 1))
    finally:
        for hook in hooks:
            hook.remove()
    return losses


def write_back(model: ir.Model, params: Mapping[str, object]) -> dict[str, float]:
    """Store trained ``params`` as the model's float32 initializers; the largest change of each."""
    moved = {}
    for name, p in params.items():
        values = p.detach().numpy().astype(np.float32)
        moved[name] = float(np.max(np.abs(values - model.graph.initializers[name].const_value.numpy())))
        model.graph.initializers[name].const_value = ir.tensor(values, name=name)
    return moved
