"""Weights that cannot saturate a kernel which sums pairs of uint8 x int8 products in int16.

onnxruntime's uint8 x int8 GEMM on x86-64 without VNNI (AVX2, AVX512BW) multiplies with
VPMADDUBSW: each pair of adjacent products a0*w0 + a1*w1 is added in int16 with saturation before
the int32 accumulation. With activation codes up to 255, two weights of the same sign whose
magnitudes sum to more than 32767 // 255 = 128 can overflow, and the layer's output is then wrong
(a ResNet-56 fell from 28.9 dB to 14.9 dB). Which weights end up adjacent depends on the kernel's
packing, so the guarantee here holds for every pairing: in each output channel the two largest
weights of each sign sum to at most ``limit``. onnxruntime's ``reduce_range`` reaches the same by
7-bit weights everywhere ([-64, 64]); choosing the largest safe range per channel keeps up to
127 levels where a channel's weights allow it.
"""

from __future__ import annotations

import numpy as np

#: Activation codes span 0..255 (int8 activations are shifted to uint8 by the kernels).
ACTIVATION_CODE_MAX = 255
INT16_MAX = 32767


def pair_sum_limit(activation_code_max: int = ACTIVATION_CODE_MAX) -> int:
    """Largest |w0| + |w1| (same sign) for which ``activation_code_max`` x the sum fits int16."""
    return INT16_MAX // activation_code_max


def _top_two(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two largest values of each row (0 where a row has fewer positive values)."""
    if rows.shape[1] < 2:
        padded = np.zeros((rows.shape[0], 2), rows.dtype)
        padded[:, : rows.shape[1]] = rows
        rows = padded
    top = -np.partition(-rows, 1, axis=1)[:, :2]
    return np.maximum(top[:, 0], 0), np.maximum(top[:, 1], 0)


def pair_safe_scale(w: np.ndarray, axis: int | None, bound: np.ndarray, qmax: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric scales (float32, the shape of ``bound``) under which no two weights
    of one sign in a channel quantize to magnitudes summing above ``limit``, and each channel's
    largest code ``t`` (int64): weights beyond the bound (a clipped range) must saturate at it.

    ``bound`` is each channel's clipping bound (max |w| for min/max ranges); the scale is
    ``bound / t`` with ``t`` the largest integer in ``[ceil(limit / 2), qmax]`` that keeps the pair
    sums within ``limit`` after round-half-to-even, exactly as QuantizeLinear rounds. The lower
    end always qualifies: every magnitude is then at most ``t`` and two sum to at most ``limit``.
    """
    bound = np.asarray(bound, np.float64)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
    rows = rows.astype(np.float32)
    # The two largest positive weights and the two largest negative magnitudes of each channel:
    # no other pair can sum to more than these.
    p1, p2 = _top_two(rows)
    n1, n2 = _top_two(-rows)
    b = np.atleast_1d(bound)
    low = -(-limit // 2)
    candidates = np.arange(low, max(qmax, low) + 1, dtype=np.float64)  # [K]
    scales = np.maximum(b[:, None] / candidates[None, :], np.float64(1e-12)).astype(np.float32)  # [C, K]

    def code(x: np.ndarray) -> np.ndarray:
        # float32 division, as QuantizeLinear (and `quantize`) computes it.
        return np.minimum(np.rint(x[:, None].astype(np.float32) / scales).astype(np.float64), candidates[None, :])

    safe = (code(p1) + code(p2) <= limit) & (code(n1) + code(n2) <= limit)
    # The largest safe candidate per channel; the lowest is safe by construction.
    best = np.where(safe, np.arange(candidates.size)[None, :], 0).max(axis=1)
    chosen = scales[np.arange(b.size), best]
    return chosen.reshape(np.shape(bound)).astype(np.float32), candidates[best].astype(np.int64).reshape(np.shape(bound))


def max_pair_sum(q: np.ndarray, axis: int | None) -> int:
    """The largest |w0| + |w1| over same-sign pairs of integer weights ``q`` within any channel
    (what `pair_safe_scale` keeps at or below its limit; ``qc validate`` checks it)."""
    rows = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1) if axis is not None and q.ndim > 0 else q.reshape(1, -1)
    rows = rows.astype(np.int64)
    p1, p2 = _top_two(rows)
    n1, n2 = _top_two(-rows)
    return int(max((p1 + p2).max(initial=0), (n1 + n2).max(initial=0)))
