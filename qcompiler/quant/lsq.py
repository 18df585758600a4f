"""Learned step size quantization (LSQ, Esser et al. 2020): fake quantization whose scale trains.

``(clip(round(x / s) + z, lo, hi) - z) * s`` with rounding straight-through: the gradient with
respect to ``x`` passes where ``x`` is inside the range and the one with respect to ``s`` is
LSQ's (``round(x/s) - x/s`` inside, the clipped end outside). LSQ scales the step's gradient by
``1 / sqrt(n * hi)`` (n values share the step), so a per-channel step with many weights does not
move faster than the weights themselves.
"""

from __future__ import annotations

import math

import numpy as np


def grad_scaled(p, factor: float):
    """``p`` in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return (p - p * factor).detach() + p * factor


def round_ste(t):
    """Round half to even forward, identity backward."""
    import torch

    return t + (torch.round(t) - t).detach()


def broadcast(p, ndim: int, axis: int | None):
    """A per-channel tensor shaped to broadcast over ``ndim`` dimensions along ``axis``."""
    if axis is None or p.dim() == 0 or p.numel() == 1:
        return p.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def fake_quantize(x, scale, zero_point, lo, hi, axis: int | None):
    """The values ``x`` takes after QuantizeLinear + DequantizeLinear with ``scale`` (trainable) and
    codes limited to [lo, hi] (tensors broadcastable per channel along ``axis``, or scalars)."""
    import torch

    n = x.numel() / max(scale.numel(), 1)
    top = float(torch.max(hi).item()) if torch.is_tensor(hi) else float(np.max(hi))
    s = broadcast(grad_scaled(scale, 1.0 / math.sqrt(max(n * max(top, 1.0), 1.0))), x.dim(), axis)
    # A read-only numpy array (an initializer's) is copied: torch would warn on sharing it.
    z = broadcast(zero_point if torch.is_tensor(zero_point) else torch.tensor(np.array(zero_point), dtype=x.dtype), x.dim(), axis).to(x.dtype)
    lo_t = broadcast(torch.as_tensor(lo, dtype=x.dtype), x.dim(), axis)
    hi_t = broadcast(torch.as_tensor(hi, dtype=x.dtype), x.dim(), axis)
    # Clipped before rounding (the same values for integer bounds): a value past an end then
    # gives the step exactly that end as its gradient, as LSQ defines it.
    q = round_ste(torch.maximum(torch.minimum(x / s + z, hi_t), lo_t))
    return (q - z) * s

