"""AdaRound (Nagel et al., 2020): choose each weight's rounding, down or up, to minimise the error
of its layer's output instead of the error of the weight itself.

Rounding to nearest minimises ||W~ - W|| per weight, but what the network sees is the layer's
output W~ x, whose error depends on how the rounding errors of one output channel combine over
the inputs. AdaRound relaxes each weight's choice to a continuous ``h(V)`` in [0, 1] (a rectified
sigmoid), trains ``V`` by gradient descent on the layer's output error over calibration inputs,
and pushes every ``h`` to 0 or 1 with a regulariser whose sharpness ``beta`` is annealed from 20
to 2, so the final hard rounding ``h >= 0.5`` is what was optimised. The grid (scale, zero point,
allowed codes) is the plain quantizer's (`qcompiler.quant.weights.WeightGrid`); only the choice
between the code below and the code above each weight changes.

Everything here is numerics on tensors; `passes/adaround.py` walks the layers and feeds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qcompiler.quant.weights import WeightGrid

#: The stretch of the rectified sigmoid (the paper's zeta and gamma): h reaches exactly 0 and 1
#: at finite V, so the regulariser can settle a weight instead of chasing V to infinity.
ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundSettings:
    """The optimisation of one layer's rounding."""

    #: Adam steps on the rounding variables per layer (the paper: 10,000). 0: round to nearest,
    #: learning nothing (the baseline, through the same pass and widths).
    iterations: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    #: Weight of the rounding regulariser (its mean over the weights) against the output error
    #: measured in units of rounding to nearest's (the paper's lambda, made scale-free).
    reg: float = 1.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    #: Fraction of the steps before the regulariser starts: the output error alone first.
    warmup: float = 0.2

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_size < 1 or not self.lr > 0 or self.reg < 0 or not 0 <= self.warmup < 1:
            raise ValueError("AdaRound needs iterations >= 0, batch-size >= 1, lr > 0, reg >= 0 and 0 <= warmup < 1")


def rectified_sigmoid(v):
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) (torch)."""
    import torch

    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_logits(w: np.ndarray, grid: WeightGrid) -> tuple[np.ndarray, np.ndarray]:
    """(floor codes, V) such that ``floor + h(V)`` equals ``w`` on the grid's scale: the search
    starts at the float weight, and its first hard rounding (h >= 0.5) is rounding to nearest."""
    s = grid.expand(np.asarray(grid.scale, np.float64), w.ndim)
    z = grid.expand(np.asarray(grid.zero_point, np.float64), w.ndim)
    x = w.astype(np.float64) / s
    floor = np.floor(x)
    rest = np.clip(x - floor, 1e-4, 1 - 1e-4)
    p = (rest - GAMMA) / (ZETA - GAMMA)
    return (floor + z).astype(np.int64), np.log(p / (1 - p)).astype(np.float32)


def rounding_regularizer(h, beta: float):
    """sum(1 - |2h - 1|^beta): zero where every h is 0 or 1, largest at 1/2."""
    import torch

    return torch.sum(1 - torch.abs(2 * h - 1) ** beta)


def beta_at(step: int, settings: AdaRoundSettings) -> float | None:
    """The regulariser's beta at ``step`` (cosine from beta_start to beta_end after the warm-up);
    None during the warm-up, when the regulariser is off."""
    start = settings.warmup * settings.iterations
    if step < start:
        return None
    progress = (step - start) / max(settings.iterations - start, 1)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + math.cos(progress * math.pi))


def hard_codes(floor: np.ndarray, v: np.ndarray, grid: WeightGrid) -> np.ndarray:
    """The final codes: the floor, plus one where h(V) >= 1/2, within the grid's allowed codes."""
    h = np.clip(1 / (1 + np.exp(-v.astype(np.float64))) * (ZETA - GAMMA) + GAMMA, 0, 1)
    return np.clip(floor + (h >= 0.5), grid.expand(grid.lo, floor.ndim), grid.expand(grid.hi, floor.ndim))


def pair_sum_violations(codes: np.ndarray, zero_point: np.ndarray, axis: int | None, limit: int) -> np.ndarray:
    """Per channel (along ``axis``), whether two weights of one sign have magnitudes summing above
    ``limit`` (what an int16 pair accumulator saturates on)."""
    z = np.asarray(zero_point).reshape(-1)[0] if np.size(zero_point) else 0
    rows = (np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1) if axis is not None else codes.reshape(1, -1)) - z
    padded = np.concatenate([rows, np.zeros((rows.shape[0], 2), rows.dtype)], axis=1)
    pos = -np.partition(-np.maximum(padded, 0), 1, axis=1)[:, :2].sum(axis=1)
    neg = -np.partition(-np.maximum(-padded, 0), 1, axis=1)[:, :2].sum(axis=1)
    return (pos > limit) | (neg > limit)


@dataclass(frozen=True)
class RoundingResult:
    """A layer's rounding: the codes, and the output error before and after on the same inputs."""

    codes: np.ndarray
    nearest_mse: float
    adaround_mse: float
    flipped: float  # fraction of the codes that differ from rounding to nearest
    reverted_channels: int  # channels put back to nearest rounding (pair sums over the CPU's limit)


LayerFn = Callable[[object, object], object]


def optimize_rounding(layer: LayerFn, inputs, targets, w: np.ndarray, grid: WeightGrid, settings: AdaRoundSettings, *,
                      seed: int = 0, pair_sum_limit: int | None = None, progress: Callable[[], None] | None = None) -> RoundingResult:
    """Learn the rounding of ``w`` on ``grid`` so that ``layer(x, w~)`` matches ``targets``.

    ``layer(x, w)`` computes the layer (and the activation it feeds, when that is part of what
    must match) with torch; ``inputs`` are its inputs in the partly quantized network, ``targets``
    its outputs in the float network (torch tensors, samples first). The output error is the
    squared error summed over channels (axis 1) and averaged over the rest, as in the paper.
    """
    import torch

    floor_np, v_np = initial_logits(w, grid)
    s = torch.from_numpy(np.asarray(grid.expand(grid.scale, w.ndim), np.float32))
    z = torch.from_numpy(np.asarray(grid.expand(grid.zero_point, w.ndim), np.float32))
    lo = torch.from_numpy(np.asarray(grid.expand(grid.lo, w.ndim), np.float32))
    hi = torch.from_numpy(np.asarray(grid.expand(grid.hi, w.ndim), np.float32))
    floor = torch.from_numpy(floor_np.astype(np.float32))
    v = torch.nn.Parameter(torch.from_numpy(v_np))
    optimizer = torch.optim.Adam([v], lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    n = len(inputs)

    def weight_of(codes):
        return (torch.maximum(torch.minimum(codes, hi), lo) - z) * s

    def output_error(out, target):
        return torch.mean(torch.sum((out - target) ** 2, dim=1)) if out.ndim > 1 else torch.mean((out - target) ** 2)

    def mean_error(q: np.ndarray) -> float:
        wq = torch.from_numpy(grid.dequantize(q))
        with torch.no_grad():
            total = sum(float(output_error(layer(inputs[i : i + 256], wq), targets[i : i + 256])) * len(inputs[i : i + 256]) for i in range(0, n, 256))
        return total / n

    nearest = grid.nearest(w)
    nearest_error = mean_error(nearest)
    # The output error in units of rounding to nearest's: the regulariser's weight then means the
    # same for a layer whatever the size of its outputs (the paper's lambda depends on it).
    unit = nearest_error if nearest_error > 0 else 1.0
    for step in range(settings.iterations):
        idx = torch.randint(0, n, (min(settings.batch_size, n),), generator=generator)
        h = rectified_sigmoid(v)
        loss = output_error(layer(inputs[idx], weight_of(floor + h)), targets[idx]) / unit
        beta = beta_at(step, settings)
        if beta is not None and settings.reg > 0:
            loss = loss + settings.reg * rounding_regularizer(h, beta) / h.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress()

    if settings.iterations == 0:
        return RoundingResult(codes=nearest, nearest_mse=nearest_error, adaround_mse=nearest_error, flipped=0.0, reverted_channels=0)
    codes = hard_codes(floor_np, v.detach().numpy(), grid)
    reverted = 0
    if pair_sum_limit is not None:
        bad = pair_sum_violations(codes, grid.zero_point, grid.axis, pair_sum_limit)
        if bad.any():
            # Rounding up two large weights of a channel can overflow where nearest did not:
            # those channels keep the proven-safe nearest codes.
            mask = grid.expand(bad, w.ndim) if grid.axis is not None else np.asarray(bad[0])
            codes = np.where(mask, nearest, codes)
            reverted = int(bad.sum())
    learned_error = mean_error(codes)
    if learned_error > nearest_error:
        # Too few steps or samples to beat the plain rounding on the data at hand: keep it.
        codes, learned_error = nearest, nearest_error
    return RoundingResult(codes=codes, nearest_mse=nearest_error, adaround_mse=learned_error, flipped=float(np.mean(codes != nearest)), reverted_channels=reverted)
