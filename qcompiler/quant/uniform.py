"""Uniform (affine) quantization: scales and zero points from ranges, quantize and dequantize.

Rounding is half-to-even, as ONNX QuantizeLinear specifies, so what numpy computes here is exactly
what onnxruntime computes.
"""

from __future__ import annotations

import numpy as np

# Below this a range is treated as empty: a scale of 0 would make QuantizeLinear divide by zero.
_MIN_SCALE = np.float32(1e-12)


def affine_params(lo: np.ndarray | float, hi: np.ndarray | float, qmin: int, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) that map [lo, hi] onto [qmin, qmax].

    The float range is first widened to contain 0 so that 0 is represented exactly (padding and
    ReLU outputs depend on it). Symmetric: zero point at the middle of the integer range
    (0 for signed types) and scale from max(|lo|, |hi|).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        bound = np.maximum(-lo, hi)
        half = (qmax - qmin) / 2.0
        scale = np.maximum(bound / half, _MIN_SCALE).astype(np.float32)
        zero_point = np.full(scale.shape, int(np.ceil((qmin + qmax) / 2.0)), dtype=np.int64)
        return scale, zero_point
    scale = np.maximum((hi - lo) / (qmax - qmin), _MIN_SCALE).astype(np.float32)
    zero_point = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)
    return scale, zero_point


def per_channel(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A per-channel array (or a scalar) shaped to broadcast over ``ndim`` dimensions along ``axis``."""
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear: ``clip(round_half_even(x / scale) + zp, qmin, qmax)`` as int64."""
    s = per_channel(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = per_channel(np.asarray(zero_point, dtype=np.int64), x.ndim, axis)
    return np.clip(np.rint(x.astype(np.float32) / s).astype(np.int64) + z, qmin, qmax)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    """DequantizeLinear: ``(q - zp) * scale`` as float32 (``q`` integer, or float8 with zp 0)."""
    s = per_channel(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    if q.dtype.kind not in "iub":  # float8 (ml_dtypes): its zero point is 0
        return (q.astype(np.float32) * s).astype(np.float32)
    z = per_channel(np.asarray(zero_point, dtype=np.int64), q.ndim, axis)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def channel_ranges(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of a weight per channel along ``axis`` (or over the whole tensor)."""
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return moved.min(axis=1), moved.max(axis=1)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - approx.astype(np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def mse_channel_ranges(
    w: np.ndarray, axis: int | None, qmin: int, qmax: int, symmetric: bool, grid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ranges that minimise the squared quantization error of ``w``.

    Each channel's [min, max] is shrunk by the factor on ``grid`` (default 0.15 .. 1.00) that
    gives the lowest sum of squared errors: clipping a few outliers buys a finer step for all
    other weights. The loop runs over the grid, each step vectorised over all weights.
    """
    # Down to 0.15: a 2-bit (ternary) channel's best threshold sits far inside its range.
    grid = np.linspace(0.15, 1.0, 35) if grid is None else grid
    lo, hi = channel_ranges(w, axis)
    lo, hi = np.atleast_1d(lo).astype(np.float64), np.atleast_1d(hi).astype(np.float64)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
    rows = rows.astype(np.float32)
    best_err = np.full(rows.shape[0], np.inf)
    best = np.ones(rows.shape[0])
    for factor in grid:
        scale, zp = affine_params(factor * lo, factor * hi, qmin, qmax, symmetric)
        approx = dequantize(quantize(rows, scale, zp, qmin, qmax, axis=0), scale, zp, axis=0)
        err = np.sum((rows - approx) ** 2, axis=1, dtype=np.float64)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = factor
    if axis is None:
        return np.asarray(best[0] * lo[0]), np.asarray(best[0] * hi[0])
    return best * lo, best * hi


INT32_MAX = 2**31 - 1


def int32_bias_scale_floor(bias: np.ndarray, input_scale: float, headroom: float = 2.0) -> np.ndarray:
    """The smallest weight scale per output channel for which an int32 bias of scale
    input scale x weight scale still holds ``bias`` (``headroom`` x, for bias correction's change).

    A dead or nearly dead weight channel otherwise gets a tiny scale, its bias / (s_x x s_w)
    exceeds int32, and the bias would be clipped in silence.
    """
    return np.abs(np.asarray(bias, np.float64)) * headroom / (float(input_scale) * INT32_MAX)


def raise_scales(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, floor: np.ndarray, qmin: int, qmax: int, axis: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """``q`` and ``scale`` with every channel whose scale is below ``floor`` requantized at the
    floor (other channels untouched); and how many channels were raised. A larger scale only
    shrinks the codes, so limits on them (pair sums, a narrow width) still hold."""
    scale = np.asarray(scale, np.float32)
    floor = np.asarray(floor, np.float64)
    if scale.ndim == 0 or axis is None:
        floor = floor.max(initial=0.0)
    low = scale < floor
    if not low.any():
        return q, scale, 0
    raised = np.where(low, floor, scale).astype(np.float32)
    requantized = quantize(w, raised, zero_point, qmin, qmax, axis=axis)
    mask = per_channel(np.asarray(low), w.ndim, axis) if axis is not None and raised.ndim else np.asarray(low)
    return np.where(mask, requantized, q), raised, int(np.sum(low))
