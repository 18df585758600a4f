"""cluster-weights: replace each Conv/Gemm/MatMul weight by a codebook lookup (Choi et al. 2017).

Every weight value becomes one of a few shared centres; the model stores the centres (float) and
each weight's index (the smallest unsigned integer type that holds them), and computes the weight
as ``Gather(codebook, Cast(indices, int32))``, so onnxruntime runs exactly what ships (and folds
the lookup into a constant when it loads the model). ONNX Gather takes int32/int64 indices only,
hence the Cast.

Methods (see `qcompiler.codebook.clustering`):

- ``kmeans``: plain k-means on the values;
- ``hessian-kmeans``: k-means weighted by the Hessian diagonal h_ii (`hessian-diagonal` analysis,
  Hutchinson or the gradient second moment), so sensitive weights get the resolution;
- ``uniform``: equally spaced bins, each centre moved to the Hessian-weighted mean of its bin
  (``centres=weighted``), or left on the grid (``centres=grid``): then the weight is stored as
  ``DequantizeLinear(uint8 indices, step, zero point)``, the standard ONNX form every QDQ tool reads;
- ``ecsq``: iterative entropy-constrained scalar quantization: Hessian-weighted centres, and an
  assignment that weighs every weight's squared error alike (``assignment-weight=unit``, the
  absolute error uniform quantization bounds) and moves it only to one of the two centres around
  it. Weighing the assignment by the per-weight Hessian (``assignment-weight=hessian``, Choi et
  al.'s formulation) sends every weight whose estimate is tiny to the most probable centre, and on
  ResNet-32 that costs 20-60 points against uniform; weighing it by the layer's scale
  (``assignment-weight=layer-scale``: 1 / the layer's mean squared weight) starves the layers with
  the largest weights, the first convolution and the classifier, of resolution (ResNet-32 at 1.5
  bits: 21 % instead of 62 %; `bench/notes/ecsq_resnet32.md`).

``scope=network`` clusters all weights together with one codebook, as the paper does; ``layer``
gives each weight its own. ``target-bits`` (uniform, ecsq) searches the step or lambda that makes
the entropy of the indices, the rate Huffman coding approaches, hit that many bits per weight.
Pruned weights (`prune-magnitude`'s masks, and by default any weight that is exactly zero) are
kept out of the clustering and point at an exact zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.codebook import FLOAT_WEIGHTS_FACT, PRUNED_FACT, ZERO_INDEX_KEY
from qcompiler.codebook.clustering import ecsq, entropy_bits, kmeans, uniform
from qcompiler.errors import QCError
from qcompiler.hessian import HessianDiagonal, quantizable_weights
from qcompiler.ir import SOURCE_KEY, NameAuthority, add_initializer
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass

Method = Literal["kmeans", "hessian-kmeans", "uniform", "ecsq"]


@dataclass
class _Group:
    """Weights that share one codebook (one per layer, or all of them)."""

    names: list[str]
    values: np.ndarray  # concatenated unpruned values
    importance: np.ndarray
    masks: list[np.ndarray]  # per weight: True where pruned
    layer_scale: np.ndarray  # per value: 1 / mean square of its layer's unpruned values


@register_pass
class ClusterWeights(Pass):
    """Replace weights by shared codebook centres (k-means, Hessian k-means, uniform, ECSQ) looked up with Gather."""

    name = "cluster-weights"

    @dataclass(frozen=True)
    class Options:
        method: Method = "hessian-kmeans"
        #: Centres per codebook (the starting count for ecsq; for uniform without target-bits, the
        #: number of bins spanning the range).
        clusters: int = 16
        scope: Literal["layer", "network"] = "network"
        #: Hessian diagonal used as importance: Hutchinson's estimator or the gradient second moment.
        hessian: Literal["hutchinson", "fisher"] = "fisher"
        #: ECSQ's Lagrange multiplier on the code length (relative: scaled by mean h x var w).
        lambda_: float = 0.0
        #: Average coded bits per (unpruned) weight to hit, for uniform and ecsq (0: off).
        target_bits: float = 0.0
        #: ecsq only: what weighs each weight's error when it is assigned a centre. unit: plain
        #: squared error; layer-scale: 1 / its layer's mean squared weight (relative error per
        #: layer); hessian: its own Hessian diagonal, as in Choi et al. Centres are Hessian-weighted in all.
        assignment_weight: Literal["unit", "layer-scale", "hessian"] = "unit"
        iterations: int = 100
        #: uniform only. weighted: each bin's centre at the Hessian-weighted mean of its members
        #: (Choi et al.); grid: centres stay at step x integer, lowered to DequantizeLinear.
        centres: Literal["weighted", "grid"] = "weighted"
        #: Treat weights that are exactly zero as pruned (kept at zero, coded as zero runs), as
        #: in a model pruned by an earlier compile or another tool; prune-magnitude's masks count anyway.
        keep_zeros: bool = True

        def __post_init__(self) -> None:
            if self.clusters < 1:
                raise ValueError(f"option 'clusters' must be >= 1, got {self.clusters}")
            if self.lambda_ < 0 or self.target_bits < 0:
                raise ValueError("options 'lambda' and 'target-bits' must be >= 0")
            if self.target_bits and self.method in ("kmeans", "hessian-kmeans"):
                raise ValueError("option 'target-bits' applies to method=uniform or ecsq (k-means sets its rate by 'clusters')")
            if self.centres == "grid" and self.method != "uniform":
                raise ValueError("option 'centres=grid' applies to method=uniform only")
            if self.assignment_weight != "unit" and self.method != "ecsq":
                raise ValueError("option 'assignment-weight' applies to method=ecsq only")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        o = self.options
        graph = model.graph
        weights = [n for n in quantizable_weights(model) if graph.initializers[n].dtype == ir.DataType.FLOAT]
        skipped = [name for name, value in graph.initializers.items() if name not in weights and value.const_value is not None and _feeds_weight_slot(model, name)]
        for name in skipped:
            ctx.note(self.name, f"weight '{name}' is {graph.initializers[name].dtype}, not float32: left as it is", level="warning")
        if not weights:
            return PassResult(model, False, {"clustered": 0})
        masks = ctx.facts.get(PRUNED_FACT, {})
        importance = self._importance(model, ctx) if o.method != "kmeans" else None
        groups = self._groups(model, weights, masks, importance)
        names = NameAuthority(graph)
        float_weights = ctx.facts.setdefault(FLOAT_WEIGHTS_FACT, {})
        for name in weights:
            float_weights.setdefault(name, graph.initializers[name].const_value.numpy().copy())
        stats_layers = {}
        total_values = coded_rate_bits = 0.0
        for group in groups:
            centres, assignment, step = self._cluster(group)
            rate = entropy_bits(assignment, len(centres))
            total_values += len(group.values)
            coded_rate_bits += rate * len(group.values)
            if o.centres == "grid":
                self._rewrite_grid(model, names, group, np.rint(centres / step).astype(np.int64), step, assignment)
            else:
                self._rewrite(model, names, group, centres, assignment)
            for name, mask in zip(group.names, group.masks):
                stats_layers[name] = {"clusters": len(centres), "pruned": round(float(mask.mean()), 4)}
        return PassResult(model, True, {
            "method": o.method, "scope": o.scope, "clustered": len(weights), "skipped": skipped, "codebooks": len(groups),
            "entropy_bits": round(coded_rate_bits / max(total_values, 1), 4), "layers": stats_layers,
        })

    # -- pieces ---------------------------------------------------------------------------------
    def _importance(self, model: ir.Model, ctx: PassContext) -> dict[str, np.ndarray]:
        diagonal = ctx.analyses.get(HessianDiagonal(method=self.options.hessian, seed=ctx.seed), model, ctx)
        # Hutchinson's per-weight estimate can be noisy or negative where curvature is tiny; the
        # clustering needs non-negative weights, and a floor keeps every value in play.
        out = {}
        for name, h in diagonal.items():
            h = np.maximum(np.asarray(h, dtype=np.float64), 0.0)
            floor = 1e-6 * float(h.mean()) if h.mean() > 0 else 1e-12
            out[name] = h + floor
        return out

    def _groups(self, model: ir.Model, weights: list[str], masks: dict, importance: dict | None) -> list[_Group]:
        per_weight = []
        for name in weights:
            w = model.graph.initializers[name].const_value.numpy().astype(np.float64)
            mask = masks.get(name, np.zeros(w.shape, bool))
            if self.options.keep_zeros:
                mask = mask | (w == 0.0)
            h = importance[name] if importance is not None else np.ones(w.shape)
            kept = w[~mask]
            mean_square = float(np.mean(kept**2)) if kept.size else 0.0
            scale = np.full(kept.shape, 1.0 / mean_square if mean_square > 0 else 1.0)
            per_weight.append(_Group([name], kept, np.asarray(h)[~mask], [mask], scale))
        if self.options.scope == "layer":
            groups = per_weight
        else:
            groups = [_Group([n for g in per_weight for n in g.names], np.concatenate([g.values for g in per_weight]),
                             np.concatenate([g.importance for g in per_weight]), [m for g in per_weight for m in g.masks],
                             np.concatenate([g.layer_scale for g in per_weight]))]
        for g in groups:
            if self.options.clusters > len(g.values):
                where = f"weight '{g.names[0]}'" if len(g.names) == 1 else "the network"
                raise QCError(f"{self.options.clusters} clusters for {len(g.values)} unpruned values of {where}", pass_name=self.name, option="clusters")
        return groups

    def _cluster(self, group: _Group) -> tuple[np.ndarray, np.ndarray, float]:
        """(centres, assignment, the uniform step or 0)."""
        o = self.options
        w, h = group.values, group.importance
        if o.method in ("kmeans", "hessian-kmeans"):
            return (*kmeans(w, h, o.clusters, iterations=o.iterations), 0.0)
        if o.method == "uniform":
            grid = o.centres == "grid"
            if not o.target_bits:
                span = float(w.max() - w.min())
                step = span / max(o.clusters - 1, 1) if span > 0 else 1.0
                return (*uniform(w, h, step, grid=grid), step)
            return _search(lambda step: uniform(w, h, step, grid=grid), o.target_bits, lo=1e-6 * float(np.ptp(w) or 1.0), hi=float(np.ptp(w) or 1.0) * 2, pass_name=self.name)
        assign = group.layer_scale if o.assignment_weight == "layer-scale" else h if o.assignment_weight == "hessian" else np.ones_like(w)

        def quantize(lam: float) -> tuple[np.ndarray, np.ndarray]:
            return ecsq(w, h, o.clusters, lam, assign_importance=assign, iterations=o.iterations)

        if not o.target_bits:
            return (*quantize(o.lambda_), 0.0)
        top = quantize(0.0)
        if entropy_bits(top[1], len(top[0])) < o.target_bits - 0.01:
            raise QCError(f"target-bits={o.target_bits} is out of reach: {o.clusters} clusters give at most {entropy_bits(top[1], len(top[0])):.3f} bits per weight (raise 'clusters')", pass_name=self.name, option="target-bits")
        centres, assignment, _ = _search(quantize, o.target_bits, lo=0.0, hi=10.0, pass_name=self.name)
        return centres, assignment, 0.0

    def _rewrite(self, model: ir.Model, names: NameAuthority, group: _Group, centres: np.ndarray, assignment: np.ndarray) -> None:
        graph = model.graph
        pruned = any(m.any() for m in group.masks)
        # With pruning, index 0 is an exact zero reserved for the pruned weights.
        codebook = np.concatenate([[0.0], centres]) if pruned else centres
        offset = 1 if pruned else 0
        index_dtype = np.uint8 if len(codebook) <= 256 else np.uint16 if len(codebook) <= 65536 else np.uint32
        codebook_value = add_initializer(graph, names, f"{group.names[0]}_codebook" if len(group.names) == 1 else "codebook", codebook.astype(np.float32))

        def lookup(name: str, index_value: ir.Value, shape: list[int]) -> list[ir.Node]:
            cast = ir.Node("", "Cast", [index_value], attributes={"to": ir.Attr("to", ir.AttributeType.INT, ir.DataType.INT32)}, name=names.fresh(f"{name}_Cast"))
            cast.outputs[0].name = names.fresh(f"{name}_indices_int32")
            cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.INT32, ir.Shape(shape)
            gather = ir.Node("", "Gather", [codebook_value, cast.outputs[0]], attributes={"axis": ir.Attr("axis", ir.AttributeType.INT, 0)}, name=names.fresh(f"{name}_Gather"))
            return [cast, gather]

        _replace_weights(graph, names, group, (assignment + offset).astype(index_dtype), 0 if pruned else None, lookup)

    def _rewrite_grid(self, model: ir.Model, names: NameAuthority, group: _Group, levels: np.ndarray, step: float, assignment: np.ndarray) -> None:
        """Each weight as DequantizeLinear(uint8 index, step, zero point): centre j is step x (j - zp).

        The grid runs from the lowest used level to the highest, through 0 so that the zero point
        is an exact zero (pruned weights point at it); unused levels in between cost nothing.
        """
        graph = model.graph
        pruned = any(m.any() for m in group.masks)
        low, high = min(int(levels.min()), 0), max(int(levels.max()), 0)
        if high - low + 1 > 256:
            raise QCError(f"the uniform grid has {high - low + 1} levels, more than a uint8 index holds (256): lower target-bits or clusters", pass_name=self.name)
        zero_point = -low
        base = group.names[0] if len(group.names) == 1 else "codebook"
        scale = add_initializer(graph, names, f"{base}_step", np.array(step, dtype=np.float32))
        zp = add_initializer(graph, names, f"{base}_zero_point", np.array(zero_point, dtype=np.uint8))
        codes = (levels - low).astype(np.uint8)

        def lookup(name: str, index_value: ir.Value, shape: list[int]) -> list[ir.Node]:
            return [ir.Node("", "DequantizeLinear", [index_value, scale, zp], name=names.fresh(f"{name}_DequantizeLinear"))]

        _replace_weights(graph, names, group, codes[assignment], zero_point if pruned else None, lookup)


def _replace_weights(graph: ir.Graph, names: NameAuthority, group: _Group, codes: np.ndarray, zero: int | None, lookup) -> None:
    """Swap each weight of ``group`` for the lookup that computes it.

    ``codes`` holds the index of every unpruned value, in group order; pruned entries get
    ``zero`` (None: the group has none). ``lookup(name, indices, shape)`` builds the nodes, the last
    of which computes the weight; it is tagged with its source weight and zero index.
    """
    start = 0
    for name, mask in zip(group.names, group.masks):
        count = int((~mask).sum())
        indices = np.full(mask.shape, zero or 0, dtype=codes.dtype)
        indices[~mask] = codes[start : start + count]
        start += count
        nodes = lookup(name, add_initializer(graph, names, f"{name}_indices", indices), list(mask.shape))
        out = nodes[-1].outputs[0]
        out.name = names.fresh(f"{name}_clustered")
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(list(mask.shape))
        nodes[-1].metadata_props[SOURCE_KEY] = name
        nodes[-1].metadata_props[ZERO_INDEX_KEY] = "" if zero is None else str(zero)
        graph.insert_before(graph[0], nodes)
        graph.initializers[name].replace_all_uses_with(out)
        graph.initializers.pop(name)


def _search(quantize, target: float, *, lo: float, hi: float, pass_name: str, steps: int = 40):
    """Bisection on a quantizer's knob (a step or lambda; larger means fewer bits) until the index
    entropy is ``target`` bits. Returns (centres, assignment, knob)."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        centres, assignment = quantize(mid)
        rate = entropy_bits(assignment, len(centres))
        if best is None or abs(rate - target) < abs(best[0] - target):
            best = (rate, centres, assignment, mid)
        if abs(rate - target) < 0.005:
            break
        if rate > target:
            lo = mid
        else:
            hi = mid
    if abs(best[0] - target) > 0.1:
        raise QCError(f"target-bits={target} is out of reach (closest rate {best[0]:.3f} bits per weight)", pass_name=pass_name, option="target-bits")
    return best[1], best[2], best[3]


def _feeds_weight_slot(model: ir.Model, name: str) -> bool:
    """Whether initializer ``name`` is the weight input of a Conv/Gemm/MatMul (whatever its dtype)."""
    value = model.graph.initializers[name]
    return any(input_roles(use.node).weight == use.idx for use in value.uses())
