"""Hessian sensitivity of the loss to each weight tensor, on the ONNX graph itself (HAWQ line of work).

`HessianTrace` estimates Tr(H_l) for every weight tensor l with Hutchinson's estimator
E[v_l^T H_ll v_l] over Rademacher probes v_l. Each probe takes one gradient (with its graph kept)
and, per layer, one Hessian-vector product by double backward through `TorchGraph`. Batches are
streamed, one per probe, cycling over the data; probing stops once every layer's relative standard
error is below ``tolerance`` (or at ``max_probes``, with the interval reported); a layer already
below it stops being probed while the others go on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import Analysis
from qcompiler.analysis_cache import cache_key, read_cached, write_cached
from qcompiler.errors import QCError
from qcompiler.ir import constant_array, is_float_tensor
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import PassContext

LossName = Literal["auto", "cross-entropy", "kl", "mse"]
#: The facts key under which the hessian-trace pass records the analysis it ran (its options).
HESSIAN_FACT = "hessian-trace"


@dataclass(frozen=True)
class TraceEstimate:
    """Tr(H_l) for one weight tensor, with its uncertainty."""

    weight: str
    node: str
    parameters: int
    trace: float
    stderr: float
    probes: int

    @property
    def ci95(self) -> tuple[float, float]:
        return self.trace - 1.96 * self.stderr, self.trace + 1.96 * self.stderr

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.trace) if self.trace else math.inf


@dataclass(frozen=True)
class HessianTraceResult:
    loss: str
    estimates: dict[str, TraceEstimate]
    probes: int
    converged: bool


def quantizable_weights(model: ir.Model) -> dict[str, str]:
    """Weight initializer name -> the node that uses it as a weight (Conv, Gemm, MatMul, ...)."""
    weights: dict[str, str] = {}
    for node in model.graph:
        roles = input_roles(node)
        if roles.weight is None or roles.weight >= len(node.inputs):
            continue
        w = node.inputs[roles.weight]
        if w is not None and is_float_tensor(w) and constant_array(w) is not None and w.name in model.graph.initializers:
            weights.setdefault(w.name, node.name)
    return weights


def choose_loss(requested: str, output_shape: tuple[int, ...], has_labels: bool) -> str:
    """The loss actually used: cross-entropy with labels, else label-free against the float model."""
    if requested != "auto":
        return requested
    if has_labels and len(output_shape) == 2 and output_shape[1] > 1:
        return "cross-entropy"
    return "kl" if len(output_shape) == 2 and output_shape[1] > 1 else "mse"


def _cache_parameters(analysis: HessianTrace) -> dict:
    return {k: getattr(analysis, k) for k in ("tolerance", "min_probes", "max_probes", "batch_size", "samples", "loss", "seed")}


def _mean_and_stderr(sums: np.ndarray, squares: np.ndarray, n: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and its standard error from running sums of values and of their squares (n per entry)."""
    n = np.maximum(n, 1)
    mean = sums / n
    variance = np.maximum(squares / n - mean**2, 0.0) * n / np.maximum(n - 1, 1)
    return mean, np.sqrt(variance / n)


@dataclass(frozen=True)
class HessianTrace(Analysis[HessianTraceResult]):
    """Per-weight Hessian traces by Hutchinson's estimator (see module docstring)."""

    name = "hessian-trace"
    tolerance: float = 0.25
    min_probes: int = 8
    max_probes: int = 100
    # ResNet-20, 1,000 images, tolerance 0.25, 2-core machine: batch 64 took 31 probes / 34 s,
    # batch 32 67 probes / 22 s (noisier per probe), batch 128 costs over 4x per probe.
    batch_size: int = 64
    samples: int = 1000
    loss: LossName = "auto"
    seed: int = 0
    #: JSON file reused when it holds traces of this same model, data and options (see analysis_cache).
    cache: str = ""

    def compute(self, model: ir.Model, ctx: PassContext) -> HessianTraceResult:
        data = ctx.data.head(self.samples) if ctx.data is not None else None
        key = cache_key(model, data, _cache_parameters(self)) if self.cache else ""
        if key and (stored := read_cached(self.cache, key)) is not None:
            estimates = {n: TraceEstimate(**e) for n, e in stored["estimates"].items()}
            return HessianTraceResult(loss=stored["loss"], estimates=estimates, probes=stored["probes"], converged=stored["converged"])
        result = self._estimate(model, ctx)
        if key:
            write_cached(self.cache, key, {"loss": result.loss, "probes": result.probes, "converged": result.converged,
                                           "estimates": {n: asdict(e) for n, e in result.estimates.items()}})
        return result

    def _estimate(self, model: ir.Model, ctx: PassContext) -> HessianTraceResult:
        import torch

        graph, weights, batches, loss_fn, loss_name = _loss_setup(model, ctx, self.samples, self.batch_size, self.loss, "hessian-trace")
        params = graph.named_weights()
        names = list(weights)
        generator = torch.Generator().manual_seed(self.seed)
        sums = np.zeros(len(names))
        squares = np.zeros(len(names))
        counts = np.zeros(len(names), dtype=np.int64)
        active = np.ones(len(names), dtype=bool)
        probes = 0
        with ctx.progress("hessian traces", self.max_probes) as progress:
            while probes < self.max_probes and active.any():
                batch, start = batches[probes % len(batches)]
                loss = loss_fn(batch, start)
                live = np.flatnonzero(active)
                tensors = [params[names[i]] for i in live]
                grads = torch.autograd.grad(loss, tensors, create_graph=True)
                for k, (i, grad, tensor) in enumerate(zip(live, grads, tensors)):
                    # A probe confined to layer i: one more backward per layer, but no cross-layer
                    # terms (with one probe for all layers they dominate the variance ~40x).
                    v = torch.randint(0, 2, tensor.shape, generator=generator).to(tensor.dtype) * 2 - 1
                    (hv,) = torch.autograd.grad(grad, tensor, grad_outputs=v, retain_graph=k < len(live) - 1)
                    sample = float((hv * v).sum())
                    sums[i] += sample
                    squares[i] += sample**2
                    counts[i] += 1
                probes += 1
                progress.advance()
                if probes >= self.min_probes:
                    # A layer whose estimate is already tight stops being probed: the double
                    # backward of each probe is the whole cost, and layers converge at very
                    # different rates (the noisiest needs several times the probes of the rest).
                    mean, stderr = _mean_and_stderr(sums, squares, counts)
                    active &= ~(stderr / np.maximum(np.abs(mean), 1e-30) < self.tolerance)
        converged = not active.any()
        mean, stderr = _mean_and_stderr(sums, squares, counts)
        estimates = {
            n: TraceEstimate(weight=n, node=weights[n], parameters=int(params[n].numel()), trace=float(mean[i]), stderr=float(stderr[i]), probes=int(counts[i]))
            for i, n in enumerate(names)
        }
        return HessianTraceResult(loss=loss_name, estimates=estimates, probes=probes, converged=converged)


@dataclass(frozen=True)
class HessianDiagonal(Analysis[dict[str, np.ndarray]]):
    """Per-weight Hessian diagonal h_ii, by weight initializer name (arrays shaped like the weights).

    ``method=hutchinson``: E[v * (H v)] over Rademacher probes v (one Hessian-vector product per
    probe covers every layer: the diagonal needs no per-layer confinement, since E[v_i v_j] = 0
    removes every off-diagonal term alike). ``method=fisher``: the second moment E[g_i^2] of
    mini-batch gradients (what Adam's ``v`` tracks, Choi et al.'s cheap alternative): no second
    derivatives, always positive, one backward pass per batch of ``fisher_batch_size``.
    """

    name = "hessian-diagonal"
    method: Literal["hutchinson", "fisher"] = "hutchinson"
    probes: int = 32
    batch_size: int = 128
    # Small batches: more gradient samples per pass over the data, the noise term of E[g_B^2]
    # (var/B) keeping the per-weight ordering of a per-sample Fisher.
    fisher_batch_size: int = 16
    samples: int = 1000
    loss: LossName = "auto"
    seed: int = 0

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[str, np.ndarray]:
        import torch

        graph, weights, batches, loss_fn, _ = _loss_setup(model, ctx, self.samples, self.batch_size if self.method == "hutchinson" else self.fisher_batch_size, self.loss, "hessian-diagonal")
        params = graph.named_weights()
        names = list(weights)
        tensors = [params[n] for n in names]
        sums = [torch.zeros_like(t) for t in tensors]
        generator = torch.Generator().manual_seed(self.seed)
        steps = self.probes if self.method == "hutchinson" else len(batches)
        with ctx.progress(self.name, steps) as progress:
            for step in range(steps):
                batch, start = batches[step % len(batches)]
                loss = loss_fn(batch, start)
                if self.method == "hutchinson":
                    grads = torch.autograd.grad(loss, tensors, create_graph=True)
                    vs = [torch.randint(0, 2, t.shape, generator=generator).to(t.dtype) * 2 - 1 for t in tensors]
                    hvs = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), tensors)
                    for acc, hv, v in zip(sums, hvs, vs):
                        acc += (hv * v).detach()
                else:
                    grads = torch.autograd.grad(loss, tensors)
                    for acc, g in zip(sums, grads):
                        acc += g.detach() ** 2
                progress.advance()
        return {n: (acc / steps).numpy() for n, acc in zip(names, sums)}


def _loss_setup(model: ir.Model, ctx: PassContext, samples: int, batch_size: int, loss: str, pass_name: str):
    """The torch graph with trainable weights, the (batch, first sample) pairs, the loss function
    and the loss's name (cross-entropy with labels, else KL or MSE against the float model)."""
    import torch

    from qcompiler.torch_exec import TorchGraph
    from qcompiler.training import output_value, resolve_loss, task_loss

    if ctx.data is None:
        raise QCError("Hessian estimates need data: pass --calib FILE.npz", pass_name=pass_name)
    weights = quantizable_weights(model)
    if not weights:
        raise QCError("the model has no constant float weights (Conv/Gemm/MatMul) to measure", pass_name=pass_name)
    out_value = output_value(model, pass_name)
    graph = TorchGraph(model, trainable=weights)
    data = ctx.data.head(samples)
    step = data.fixed_batch or batch_size
    batches = [(b, s) for b, s in zip(data.batches(batch_size), range(0, data.usable_samples, step))]
    labels = data.labels
    loss_name = resolve_loss(graph, data, out_value.name, loss, batch_size, pass_name)

    def loss_fn(batch: dict[str, np.ndarray], start: int) -> torch.Tensor:
        out = graph.run(batch, [out_value.name])[out_value.name]
        # The weights are at their float values, so the float outputs are these outputs, detached:
        # KL(p_float || p) at p = p_float, zero gradient, Hessian = the Fisher of the outputs.
        reference = None if loss_name == "cross-entropy" else out.detach()
        batch_labels = None if labels is None else labels[start : start + len(out)]
        return task_loss(loss_name, out, batch_labels, reference)

    return graph, weights, batches, loss_fn, loss_name
