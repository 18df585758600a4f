"""Bit-width assignment as an integer linear program, and the baselines it is compared with.

Choose one width per layer, x[l, b] in {0, 1}, sum_b x[l, b] = 1, minimising the total sensitivity
sum Omega_l(b) x[l, b] subject to the weight bits sum n_l b x[l, b] <= budget. Solved exactly with
HiGHS (scipy.optimize.milp).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qcompiler.errors import QCError


def _check_budget(sizes: np.ndarray, bits: Sequence[int], budget_bits: float) -> None:
    smallest = float(np.sum(sizes) * min(bits))
    if budget_bits < smallest - 1e-9:
        raise QCError(f"no assignment fits {budget_bits / 8:.0f} weight bytes; the smallest feasible is {smallest / 8:.0f} bytes (every layer at {min(bits)} bits)", option="budget")


def solve_ilp(omega: np.ndarray, sizes: np.ndarray, bits: Sequence[int], budget_bits: float) -> np.ndarray:
    """Exact assignment: index into ``bits`` per layer. ``omega`` is [layers, len(bits)]."""
    _check_budget(sizes, bits, budget_bits)
    layers, choices = omega.shape
    cost = omega.reshape(-1)
    one_per_layer = np.kron(np.eye(layers), np.ones(choices))
    weight_bits = (sizes[:, None] * np.asarray(bits)[None, :]).reshape(1, -1)
    result = milp(
        cost,
        constraints=[LinearConstraint(one_per_layer, 1, 1), LinearConstraint(weight_bits, -np.inf, budget_bits)],
        integrality=np.ones_like(cost),
        bounds=Bounds(0, 1),
    )
    if result.x is None:
        raise QCError(f"the integer program found no assignment ({result.message})", option="budget")
    return np.round(result.x).reshape(layers, choices).argmax(axis=1)


def solve_uniform(sizes: np.ndarray, bits: Sequence[int], budget_bits: float) -> np.ndarray:
    """The widest single width for all layers that fits the budget."""
    _check_budget(sizes, bits, budget_bits)
    fitting = [i for i, b in enumerate(bits) if np.sum(sizes) * b <= budget_bits + 1e-9]
    return np.full(len(sizes), max(fitting, key=lambda i: bits[i]))


def solve_greedy(omega: np.ndarray, sizes: np.ndarray, bits: Sequence[int], budget_bits: float) -> np.ndarray:
    """Start at the widest width; repeatedly narrow the layer whose step costs least sensitivity per bit saved."""
    _check_budget(sizes, bits, budget_bits)
    order = np.argsort(bits)  # index positions from narrow to wide
    rank = np.full(len(sizes), len(bits) - 1)
    used = float(np.sum(sizes) * bits[order[-1]])
    while used > budget_bits + 1e-9:
        best, best_ratio = -1, np.inf
        for l in range(len(sizes)):
            if rank[l] == 0:
                continue
            cur, nxt = order[rank[l]], order[rank[l] - 1]
            saved = sizes[l] * (bits[cur] - bits[nxt])
            ratio = (omega[l, nxt] - omega[l, cur]) / saved
            if ratio < best_ratio:
                best, best_ratio = l, ratio
        rank[best] -= 1
        used -= sizes[best] * (bits[order[rank[best] + 1]] - bits[order[rank[best]]])
    return order[rank]


def solve_random(sizes: np.ndarray, bits: Sequence[int], budget_bits: float, seed: int = 0) -> np.ndarray:
    """A random assignment at (as close as possible to) the same budget: the floor any method must beat."""
    _check_budget(sizes, bits, budget_bits)
    rng = np.random.default_rng(seed)
    order = np.argsort(bits)
    rank = np.full(len(sizes), len(bits) - 1)
    used = float(np.sum(sizes) * bits[order[-1]])
    while used > budget_bits + 1e-9:
        l = int(rng.choice(np.flatnonzero(rank > 0)))
        rank[l] -= 1
        used -= sizes[l] * (bits[order[rank[l] + 1]] - bits[order[rank[l]]])
    return order[rank]


def pareto_front(omega: np.ndarray, sizes: np.ndarray, bits: Sequence[int], points: int = 12) -> list[tuple[float, float]]:
    """(weight bytes, total sensitivity) of the exact optimum at evenly spaced budgets."""
    lo, hi = float(np.sum(sizes) * min(bits)), float(np.sum(sizes) * max(bits))
    front = []
    for budget in np.linspace(lo, hi, points):
        choice = solve_ilp(omega, sizes, bits, budget)
        front.append((float(np.sum(sizes * np.asarray(bits)[choice]) / 8), float(omega[np.arange(len(sizes)), choice].sum())))
    return front
