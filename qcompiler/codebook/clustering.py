"""Scalar quantizers with a codebook (Choi et al. 2017): (Hessian-weighted) k-means, uniform with
weighted centres, and entropy-constrained scalar quantization (ECSQ).

Every function takes the values ``w`` (1-D) and per-value importances ``h`` (the Hessian diagonal,
or ones for plain k-means) and returns ``(centres, assignment)``. The distortion they minimise is
sum_i h_i (w_i - c[a_i])^2; ECSQ adds lambda x the code length -log2 p_j of each assignment.

Values are one-dimensional, so nearest-centre assignment is a binary search on the midpoints
between sorted centres (O(n log K)), and centre updates are weighted bincounts: every iteration is
a few vectorised numpy calls over the weights.
"""

from __future__ import annotations

import numpy as np

#: Lloyd iterations stop when no centre moves by more than this fraction of the value range.
_TOLERANCE = 1e-7


def _nearest(w: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (``centres`` sorted ascending)."""
    midpoints = (centres[1:] + centres[:-1]) / 2
    return np.searchsorted(midpoints, w)


def _weighted_means(w: np.ndarray, h: np.ndarray, assignment: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Importance-weighted mean of each cluster; an empty cluster keeps its centre."""
    k = len(centres)
    mass = np.bincount(assignment, weights=h, minlength=k)
    total = np.bincount(assignment, weights=h * w, minlength=k)
    return np.where(mass > 0, total / np.where(mass > 0, mass, 1), centres)


def kmeans(w: np.ndarray, h: np.ndarray, clusters: int, *, iterations: int = 100, fixed_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Importance-weighted 1-D k-means (Lloyd), centres initialised evenly over the range.

    Linear initialisation keeps centres on the rare large weights, which k-means++ or density
    initialisation starve (Han et al. 2016). ``fixed_zero`` pins one centre at exactly 0 (pruned
    weights, which must stay zero).
    """
    w = np.asarray(w, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    if clusters < 1:
        raise ValueError("clusters must be >= 1")
    if clusters > len(w):
        raise ValueError(f"{clusters} clusters for {len(w)} values")
    lo, hi = float(w.min()), float(w.max())
    centres = np.linspace(lo, hi, clusters) if clusters > 1 else np.array([np.average(w, weights=h)])
    zero = None
    if fixed_zero:
        zero = int(np.argmin(np.abs(centres)))
        centres[zero] = 0.0
        centres.sort()
        zero = int(np.flatnonzero(centres == 0.0)[0])
    span = max(hi - lo, 1e-30)
    for _ in range(iterations):
        assignment = _nearest(w, centres)
        updated = _weighted_means(w, h, assignment, centres)
        if zero is not None:
            updated[zero] = 0.0
        order = np.argsort(updated, kind="stable")
        moved = np.max(np.abs(updated - centres))
        centres = updated[order]
        if zero is not None:
            zero = int(np.flatnonzero(order == zero)[0])
        if moved <= _TOLERANCE * span:
            break
    return centres, _nearest(w, centres)


def uniform(w: np.ndarray, h: np.ndarray, step: float, *, fixed_zero: bool = False, grid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Uniform quantization with step ``step`` on a grid through 0, then each used bin's centre
    moved to the importance-weighted mean of its members (Choi et al.'s ECSQ solution (a)), or,
    with ``grid``, left at step x its integer level."""
    w = np.asarray(w, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    bins = np.rint(w / step).astype(np.int64)
    used, assignment = np.unique(bins, return_inverse=True)
    if grid:
        return used * step, assignment
    centres = _weighted_means(w, h, assignment, used * step)
    if fixed_zero and np.any(used == 0):
        centres[used == 0] = 0.0
    return centres, assignment


def entropy_bits(assignment: np.ndarray, clusters: int) -> float:
    """Empirical entropy of the assignment, in bits per value (the rate Huffman approaches)."""
    p = np.bincount(assignment, minlength=clusters) / max(len(assignment), 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def ecsq(w: np.ndarray, h: np.ndarray, clusters: int, lam: float, *, assign_importance: np.ndarray | None = None, iterations: int = 50,
         fixed_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Iterative ECSQ: minimise sum_i a_i (w_i - c_j)^2 + lam * (-log2 p_j) over assignments,
    centres and probabilities (Chou, Lookabaugh & Gray 1989), starting from ``clusters`` evenly
    spaced centres; clusters the rate term empties are dropped.

    ``h`` weighs the centres (each the h-weighted mean of its members); ``assign_importance`` (a_i,
    default ``h``) weighs each value's distortion in the assignment, which may only pick one of the
    two centres around the value. Both guard against what sinks ECSQ on deep networks: with a
    per-weight Hessian estimate as a_i, a weight whose estimate is tiny goes wherever the code is
    cheapest, and those moves all point the same way (towards the most probable centre), so their
    errors add up instead of cancelling. The pass passes a_i = 1 by default (every weight's
    absolute error alike, as uniform quantization bounds it) and keeps the Hessian for the centres.

    Each iteration is O(n): the two candidate centres come from a binary search, their costs are
    compared elementwise.
    """
    w = np.asarray(w, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    a = h if assign_importance is None else np.asarray(assign_importance, dtype=np.float64)
    centres, assignment = kmeans(w, h, clusters, iterations=5, fixed_zero=fixed_zero)
    # Costs are compared per value: scale lambda by the mean importance so its meaning does not
    # depend on the importance's units.
    lam_scaled = lam * float(np.mean(a)) * float(np.var(w) or 1.0)
    for _ in range(iterations):
        k = len(centres)
        p = np.bincount(assignment, minlength=k) / len(w)
        rate = -np.log2(np.maximum(p, 1e-300))
        above = np.clip(np.searchsorted(centres, w), 0, k - 1)
        below = np.clip(above - 1, 0, k - 1)
        cost_below = a * (w - centres[below]) ** 2 + lam_scaled * rate[below]
        cost_above = a * (w - centres[above]) ** 2 + lam_scaled * rate[above]
        new = np.where(cost_below <= cost_above, below, above)
        used = np.unique(new)
        remap = np.full(k, -1)
        remap[used] = np.arange(len(used))
        new = remap[new]
        updated = _weighted_means(w, h, new, centres[used])
        if fixed_zero and np.any(centres[used] == 0.0):
            updated[centres[used] == 0.0] = 0.0
        # Weighted means can swap neighbouring centres; the binary search needs them sorted.
        order = np.argsort(updated, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        updated, new = updated[order], inverse[new]
        done = len(used) == k and np.array_equal(new, assignment) and np.allclose(updated, centres)
        centres, assignment = updated, new
        if done:
            break
    return centres, assignment
