"""Hessian sensitivity of the loss to each weight tensor, on the ONNX graph itself (HAWQ line of work).

`HessianTrace` estimates Tr(H_l), the trace of each weight tensor l's diagonal Hessian block, by
Hutchinson-style Rademacher probes. Batches are streamed, one per probe, cycling over the data;
probing stops once every layer's relative standard error is below ``tolerance`` (or at
``max_probes``, with the interval reported). Two estimators of the same traces:

``gauss-newton`` (used where exact): H_ll = J_l^T H_z J_l + sum_k dL/dz_k d2z_k/dW_l2, with z the
network's output and H_z the loss's Hessian in z. Where the output is piecewise linear in each
weight tensor on its own (convolutions, matrix products, ReLU, pooling, residual adds, folded batch
norm: no weight meets itself in a product or a curved op), the second term is zero, so H_ll =
J_l^T H_z J_l exactly. A probe draws r per output, u = H_z^(1/2) r (closed form per loss), and ONE
backward pass gives g = J^T u with E||g_l||^2 = Tr(H_ll) for every layer at once: no double
backward, and no cross-layer terms in the variance. On ResNet-56 this is one backward per probe
instead of 57 Hessian-vector products.

``hessian-vector``: per probe, one gradient (its graph kept) and, per layer, one Hessian-vector
product by double backward with a probe confined to that layer; exact for any differentiable graph.
A layer already below the tolerance stops being probed while the others go on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import Analysis
from qcompiler.analysis_cache import cache_key, read_cached, write_cached
from qcompiler.errors import QCError
from qcompiler.ir import constant_array, is_float_tensor
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import PassContext

if TYPE_CHECKING:
    import torch

LossName = Literal["auto", "cross-entropy", "kl", "mse"]
EstimatorName = Literal["auto", "gauss-newton", "hessian-vector"]
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
    #: "gauss-newton" or "hessian-vector": how the traces were estimated (see the module docstring).
    estimator: str = "hessian-vector"


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


# How each op's output depends on its float inputs, for `gauss_newton_blocker`: where every op on
# the way from a weight to the output is one of these (and no weight meets itself in a product),
# the output is piecewise linear in each weight tensor, and its diagonal Hessian blocks are exactly
# the Gauss-Newton ones. The op semantics are ONNX's; nothing here depends on a target.
#: Affine, or piecewise affine, in all their inputs together (ReLU, max pooling: linear per piece).
_PIECEWISE_AFFINE = frozenset({
    "Add", "Sub", "Neg", "Identity", "Sum", "Mean", "Max", "Min", "Concat", "Split", "Reshape", "Flatten", "Transpose",
    "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Pad", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "ReduceSum", "ReduceMax", "ReduceMin", "Relu", "LeakyRelu", "Clip", "HardSigmoid", "Abs", "MaxPool",
    "GlobalMaxPool", "Where",
})
#: Linear in each input separately: piecewise linear in one weight as long as no weight reaches
#: two of its inputs (x * x is not).
_MULTILINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Mul"})
#: Affine in their first input when the others do not depend on any weight (a constant divisor,
#: inference batch norm, Q/DQ with constant scales: the rounding is straight-through).
_AFFINE_IN_FIRST = frozenset({"Div", "BatchNormalization", "QuantizeLinear", "DequantizeLinear"})
#: Outputs that are piecewise constant in the inputs (comparisons, shapes): no weight dependence.
_PIECEWISE_CONSTANT = frozenset({"Shape", "Equal", "Less", "Greater", "Not", "Floor", "Ceil", "Constant", "ConstantOfShape"})


def gauss_newton_blocker(model: ir.Model, weights: Iterable[str]) -> str | None:
    """None if the graph is piecewise linear in each of ``weights`` on its own (so every diagonal
    Hessian block is its Gauss-Newton block), else the first node that makes it curved, in words."""
    depends: dict[str, frozenset[str]] = {name: frozenset((name,)) for name in weights}
    for node in model.graph:
        inputs = [depends.get(v.name, frozenset()) if v is not None else frozenset() for v in node.inputs]
        reached = frozenset().union(*inputs)
        op = node.op_type
        if op in _PIECEWISE_CONSTANT or not reached:
            continue
        if node.domain not in ("", "ai.onnx"):
            return f"{node.domain}.{op} node '{node.name}'"
        if op in _MULTILINEAR:
            if sum(len(d) for d in inputs) != len(reached):
                return f"{op} node '{node.name}' multiplies a weight by itself"
        elif op in _AFFINE_IN_FIRST:
            if any(inputs[1:]):
                return f"{op} node '{node.name}' has a weight-dependent input after the first"
        elif op not in _PIECEWISE_AFFINE:
            return f"{op} node '{node.name}' is curved"
        for value in node.outputs:
            depends[value.name] = reached
    return None


def _has_output_root(loss_name: str, rank: int) -> bool:
    """Whether `_output_hessian_root` has a closed form: MSE on any output, softmax losses on [N, C]
    (cross-entropy and KL normalise a class axis differently beyond two dimensions)."""
    return loss_name == "mse" or rank == 2


def _output_hessian_root(loss_name: str, out: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """r -> H_z^(1/2) r for the batch loss's Hessian H_z in the outputs ``out``, per sample (the
    losses are means over samples); None where there is no closed form here.

    Cross-entropy and KL against the (detached) float outputs: softmax's Hessian diag(p) - p p^T
    (the KL at p = p_float equals it), whose root is diag(sqrt p) - p sqrt(p)^T, over the batch
    size. MSE (half the summed squares, averaged over samples): the identity over the batch size.
    """
    import torch

    n = len(out)
    if not _has_output_root(loss_name, out.dim()):
        return None
    if loss_name == "mse":
        return lambda r: r / math.sqrt(n)
    p = torch.softmax(out.detach().double(), dim=-1)
    root_p = p.sqrt()
    scale = 1.0 / math.sqrt(n)
    return lambda r: (root_p * r - p * (root_p * r).sum(-1, keepdim=True)) * scale


def choose_loss(requested: str, output_shape: tuple[int, ...], has_labels: bool) -> str:
    """The loss actually used: cross-entropy with labels, else label-free against the float model."""
    if requested != "auto":
        return requested
    if has_labels and len(output_shape) == 2 and output_shape[1] > 1:
        return "cross-entropy"
    return "kl" if len(output_shape) == 2 and output_shape[1] > 1 else "mse"


def _cache_parameters(analysis: HessianTrace) -> dict:
    return {k: getattr(analysis, k) for k in ("tolerance", "min_probes", "max_probes", "batch_size", "samples", "loss", "seed", "estimator")}


def _mean_and_stderr(sums: np.ndarray, squares: np.ndarray, n: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and its standard error from running sums of values and of their squares (n per entry)."""
    n = np.maximum(n, 1)
    mean = sums / n
    variance = np.maximum(squares / n - mean**2, 0.0) * n / np.maximum(n - 1, 1)
    return mean, np.sqrt(variance / n)


class _Running:
    """Per-layer running sums of probe samples, and which layers are still being probed."""

    def __init__(self, layers: int) -> None:
        self.sums = np.zeros(layers)
        self.squares = np.zeros(layers)
        self.counts = np.zeros(layers, dtype=np.int64)
        self.active = np.ones(layers, dtype=bool)

    def add(self, index: np.ndarray, samples: np.ndarray) -> None:
        self.sums[index] += samples
        self.squares[index] += samples**2
        self.counts[index] += 1

    def settle(self, tolerance: float) -> None:
        """Stop probing the layers whose relative standard error is below ``tolerance``."""
        mean, stderr = _mean_and_stderr(self.sums, self.squares, self.counts)
        self.active &= ~(stderr / np.maximum(np.abs(mean), 1e-30) < tolerance)


@dataclass(frozen=True)
class HessianTrace(Analysis[HessianTraceResult]):
    """Per-weight Hessian traces by Hutchinson-style probes (see module docstring)."""

    name = "hessian-trace"
    tolerance: float = 0.25
    #: At least this many probes, and (gauss-newton) at least one pass over the samples: the
    #: relative standard error of a few skewed samples is itself too noisy to stop on.
    min_probes: int = 8
    max_probes: int = 100
    # hessian-vector, ResNet-20, 1,000 images, tolerance 0.25, 2-core machine: batch 64 took 31
    # probes / 34 s, batch 32 67 probes / 22 s (noisier per probe), batch 128 costs over 4x per probe.
    batch_size: int = 64
    samples: int = 1000
    loss: LossName = "auto"
    seed: int = 0
    #: JSON file reused when it holds traces of this same model, data and options (see analysis_cache).
    cache: str = ""
    #: auto: gauss-newton where it is exact (the graph is piecewise linear in each weight), else
    #: hessian-vector. gauss-newton forced on a curved graph estimates the Gauss-Newton traces.
    estimator: EstimatorName = "auto"

    def compute(self, model: ir.Model, ctx: PassContext) -> HessianTraceResult:
        data = ctx.data.head(self.samples) if ctx.data is not None else None
        key = cache_key(model, data, _cache_parameters(self)) if self.cache else ""
        if key and (stored := read_cached(self.cache, key)) is not None:
            estimates = {n: TraceEstimate(**e) for n, e in stored["estimates"].items()}
            return HessianTraceResult(loss=stored["loss"], estimates=estimates, probes=stored["probes"], converged=stored["converged"], estimator=stored.get("estimator", "hessian-vector"))
        result = self._estimate(model, ctx)
        if key:
            write_cached(self.cache, key, {"loss": result.loss, "probes": result.probes, "converged": result.converged, "estimator": result.estimator,
                                           "estimates": {n: asdict(e) for n, e in result.estimates.items()}})
        return result

    def _estimate(self, model: ir.Model, ctx: PassContext) -> HessianTraceResult:
        import torch

        setup = _loss_setup(model, ctx, self.samples, self.batch_size, self.loss, "hessian-trace")
        params = setup.graph.named_weights()
        names = list(setup.weights)
        estimator = self.estimator
        if estimator == "auto":
            exact = gauss_newton_blocker(model, names) is None and _has_output_root(setup.loss_name, setup.out_rank)
            estimator = "gauss-newton" if exact else "hessian-vector"
        generator = torch.Generator().manual_seed(self.seed)
        state = _Running(len(names))
        tensors = [params[n] for n in names]
        # gauss-newton: one probe covers every layer, so none stops early (more probes for free),
        # and every sample is seen at least once before the error estimate is trusted.
        least = max(self.min_probes, len(setup.batches)) if estimator == "gauss-newton" else self.min_probes
        probes = 0
        with ctx.progress("hessian traces", self.max_probes) as progress:
            while probes < self.max_probes and state.active.any():
                batch, start = setup.batches[probes % len(setup.batches)]
                if estimator == "gauss-newton":
                    state.add(np.arange(len(names)), _gauss_newton_probe(setup, batch, start, tensors, generator))
                else:
                    live = np.flatnonzero(state.active)
                    state.add(live, _hessian_vector_probe(setup, batch, start, [tensors[i] for i in live], generator))
                probes += 1
                progress.advance()
                if probes >= least:
                    state.settle(self.tolerance)
                    if estimator == "gauss-newton" and state.active.any():
                        state.active[:] = True
        converged = not state.active.any()
        mean, stderr = _mean_and_stderr(state.sums, state.squares, state.counts)
        estimates = {
            n: TraceEstimate(weight=n, node=setup.weights[n], parameters=int(params[n].numel()), trace=float(mean[i]), stderr=float(stderr[i]), probes=int(state.counts[i]))
            for i, n in enumerate(names)
        }
        return HessianTraceResult(loss=setup.loss_name, estimates=estimates, probes=probes, converged=converged, estimator=estimator)


def _rademacher(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    import torch

    return torch.randint(0, 2, tuple(shape), generator=generator).to(dtype) * 2 - 1


def _gauss_newton_probe(setup: _LossSetup, batch: dict[str, np.ndarray], start: int, tensors: list, generator: torch.Generator) -> np.ndarray:
    """One sample of Tr(J_l^T H_z J_l) for every layer l: ||J_l^T H_z^(1/2) r||^2, one backward pass."""
    import torch

    out = setup.graph.run(batch, [setup.out_name])[setup.out_name]
    root = _output_hessian_root(setup.loss_name, out)
    if root is None:
        raise QCError(f"estimator=gauss-newton has no closed form for loss {setup.loss_name} on an output of shape {tuple(out.shape)}", pass_name="hessian-trace", option="estimator")
    # r independent per sample and output: the cross-sample terms of ||sum_n J_n^T u_n||^2 have
    # zero mean, so the batch gradient's squared norm is unbiased for the sum over samples.
    u = root(_rademacher(out.shape, torch.float64, generator)).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, grad_outputs=u)
    return np.array([float(torch.sum(g.double() ** 2)) for g in grads])


def _hessian_vector_probe(setup: _LossSetup, batch: dict[str, np.ndarray], start: int, tensors: list, generator: torch.Generator) -> np.ndarray:
    """One sample of v_l^T H_ll v_l for each of ``tensors``: a double backward per layer."""
    import torch

    loss = setup.loss_fn(batch, start)
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    samples = np.empty(len(tensors))
    for k, (grad, tensor) in enumerate(zip(grads, tensors)):
        # A probe confined to layer k: one more backward per layer, but no cross-layer terms
        # (with one probe for all layers they dominate the variance ~40x).
        v = _rademacher(tensor.shape, tensor.dtype, generator)
        (hv,) = torch.autograd.grad(grad, tensor, grad_outputs=v, retain_graph=k < len(tensors) - 1)
        samples[k] = float((hv * v).sum())
    return samples


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

        setup = _loss_setup(model, ctx, self.samples, self.batch_size if self.method == "hutchinson" else self.fisher_batch_size, self.loss, "hessian-diagonal")
        graph, weights, batches, loss_fn = setup.graph, setup.weights, setup.batches, setup.loss_fn
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


@dataclass(frozen=True)
class _LossSetup:
    """The torch graph with trainable weights, the data as (batch, first sample) pairs and the loss."""

    graph: object  # TorchGraph (torch is imported lazily)
    weights: dict[str, str]
    batches: list[tuple[dict[str, np.ndarray], int]]
    out_name: str
    out_rank: int
    loss_name: str
    labels: np.ndarray | None

    def loss_fn(self, batch: dict[str, np.ndarray], start: int) -> torch.Tensor:
        """The batch's mean loss, from a fresh forward pass."""
        from qcompiler.training import task_loss

        out = self.graph.run(batch, [self.out_name])[self.out_name]
        # The weights are at their float values, so the float outputs are these outputs, detached:
        # KL(p_float || p) at p = p_float, zero gradient, Hessian = the Fisher of the outputs.
        reference = None if self.loss_name == "cross-entropy" else out.detach()
        batch_labels = None if self.labels is None else self.labels[start : start + len(out)]
        return task_loss(self.loss_name, out, batch_labels, reference)


def _loss_setup(model: ir.Model, ctx: PassContext, samples: int, batch_size: int, loss: str, pass_name: str) -> _LossSetup:
    """The torch graph with trainable weights, the (batch, first sample) pairs and the loss (cross-entropy
    with labels, else KL or MSE against the float model)."""
    from qcompiler.torch_exec import TorchGraph
    from qcompiler.training import output_value, resolve_loss

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
    loss_name = resolve_loss(graph, data, out_value.name, loss, batch_size, pass_name)
    if out_value.shape is not None:
        rank = len(out_value.shape)
    else:
        import torch

        with torch.no_grad():
            rank = graph.run(batches[0][0], [out_value.name])[out_value.name].dim()
    return _LossSetup(graph, weights, batches, out_value.name, rank, loss_name, data.labels)
