"""Bit-width assignment as an integer linear program, and the baselines it is compared with.

Choose one width per layer, x[l, b] in {0, 1}, sum_b x[l, b] = 1, minimising the total sensitivity
sum Omega_l(b) x[l, b] subject to one resource, sum cost[l, b] x[l, b] <= budget (weight bits,
bit operations or predicted latency: `qcompiler.cost_model`). Solved exactly with HiGHS
(scipy.optimize.milp).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qcompiler.errors import QCError

#: Budget comparisons allow this relative slack, so a budget computed as exactly a uniform
#: assignment's cost is met despite floating-point rounding.
_SLACK = 1e-9


def smallest_feasible(cost: np.ndarray) -> float:
    return float(cost.min(axis=1).sum())


def _check_budget(cost: np.ndarray, budget: float, unit: str) -> None:
    smallest = smallest_feasible(cost)
    if budget < smallest * (1 - _SLACK):
        raise QCError(f"no assignment fits a budget of {budget:.6g} {unit}; the smallest feasible is {smallest:.6g} {unit} (every layer at its cheapest width)", option="budget")


def solve_ilp(omega: np.ndarray, cost: np.ndarray, budget: float, unit: str = "") -> np.ndarray:
    """Exact assignment: index into the widths per layer. ``omega`` and ``cost`` are [layers, widths]."""
    _check_budget(cost, budget, unit)
    layers, choices = omega.shape
    one_per_layer = np.kron(np.eye(layers), np.ones(choices))
    result = milp(
        omega.reshape(-1),
        constraints=[LinearConstraint(one_per_layer, 1, 1), LinearConstraint(cost.reshape(1, -1), -np.inf, budget * (1 + _SLACK))],
        integrality=np.ones(omega.size),
        bounds=Bounds(0, 1),
    )
    if result.x is None:
        raise QCError(f"the integer program found no assignment ({result.message})", option="budget")
    return np.round(result.x).reshape(layers, choices).argmax(axis=1)


def solve_uniform(cost: np.ndarray, bits: Sequence[int], budget: float, unit: str = "") -> np.ndarray:
    """The widest single width for all layers that fits the budget."""
    _check_budget(cost, budget, unit)
    fitting = [i for i in range(len(bits)) if cost[:, i].sum() <= budget * (1 + _SLACK)]
    if not fitting:
        raise QCError(f"no single width for all layers fits a budget of {budget:.6g} {unit}; the narrowest costs {cost[:, int(np.argmin(bits))].sum():.6g}", option="budget")
    return np.full(len(cost), max(fitting, key=lambda i: bits[i]))


def _narrowing(bits: Sequence[int], cost: np.ndarray, budget: float, unit: str, pick) -> np.ndarray:
    """Start every layer at its widest width and narrow one step at a time (the layer ``pick``
    chooses among those whose next step saves resource) until the budget is met."""
    _check_budget(cost, budget, unit)
    order = np.argsort(bits)  # width indices from narrow to wide
    rank = np.full(len(cost), len(bits) - 1)
    rows = np.arange(len(cost))
    used = float(cost[rows, order[rank]].sum())
    while used > budget * (1 + _SLACK):
        candidates = [l for l in rows if rank[l] > 0 and cost[l, order[rank[l] - 1]] < cost[l, order[rank[l]]]]
        if not candidates:  # steps that save nothing are skipped; skip them for good
            stuck = [l for l in rows if rank[l] > 0]
            rank[stuck] -= 1
            continue
        l = pick(candidates, rank, order)
        used -= cost[l, order[rank[l]]] - cost[l, order[rank[l] - 1]]
        rank[l] -= 1
    return order[rank]


def solve_greedy(omega: np.ndarray, cost: np.ndarray, bits: Sequence[int], budget: float, unit: str = "") -> np.ndarray:
    """Repeatedly narrow the layer whose step costs least sensitivity per unit of resource saved."""

    def cheapest(candidates, rank, order):
        ratio = [(omega[l, order[rank[l] - 1]] - omega[l, order[rank[l]]]) / (cost[l, order[rank[l]]] - cost[l, order[rank[l] - 1]]) for l in candidates]
        return candidates[int(np.argmin(ratio))]

    return _narrowing(bits, cost, budget, unit, cheapest)


def solve_random(cost: np.ndarray, bits: Sequence[int], budget: float, seed: int = 0, unit: str = "") -> np.ndarray:
    """A random assignment at (as close as possible to) the same budget: the floor any method must beat."""
    rng = np.random.default_rng(seed)
    return _narrowing(bits, cost, budget, unit, lambda candidates, rank, order: int(rng.choice(candidates)))


def pareto_front(omega: np.ndarray, cost: np.ndarray, points: int = 12) -> list[tuple[float, float]]:
    """(resource used, total sensitivity) of the exact optimum at evenly spaced budgets."""
    lo, hi = smallest_feasible(cost), float(cost.max(axis=1).sum())
    rows = np.arange(len(cost))
    front = []
    for budget in np.linspace(lo, hi, points):
        choice = solve_ilp(omega, cost, budget)
        front.append((float(cost[rows, choice].sum()), float(omega[rows, choice].sum())))
    return front
