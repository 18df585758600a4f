"""Per-layer weight bit-widths learned by gradient descent, two ways.

``UhlichQuantizer`` (Uhlich et al., "Mixed Precision DNNs: All you need is a good
parametrization", ICLR 2020): each layer learns its quantizer's step ``d`` and largest value
``q`` (both positive, stored as logarithms), and its width follows from them,
``b = log2(q / d + 1) + 1`` (a symmetric quantizer with ``q / d`` positive levels; with
``full_range`` one more negative level, the code ``-2^(b-1)``). Gradients with
respect to ``d`` and ``q`` are well scaled where those with respect to ``b`` are not, which is
why this trains where learning ``b`` directly struggles. Weights are divided by a fixed
per-channel range first (their channel's largest magnitude), so one layer-wide ``d`` and ``q``
serve every channel and the deployed scale is per channel: ``range_c * d``.

``BitNetQuantizer`` (Raghavan et al., 2017): an integer width per layer, weights rounded onto
``2^(b-1) - 1`` positive levels of the channel's range; ``b`` moves one allowed width at a time
against the sign of its accumulated gradient (through the step's dependence on ``b``), the rule
the paper gives. Kept for comparison.

Both hand their width to the size penalty as a tensor (`bits`), rounded up to an allowed width in
the forward pass and continuous in the backward one, so the penalty sees the deployed size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def allowed_ceil(b: float, allowed: Sequence[int]) -> int:
    """The smallest allowed width at least ``b`` (the largest allowed one if none is)."""
    ordered = sorted(allowed)
    for width in ordered:
        if width >= b - 1e-6:
            return width
    return ordered[-1]


def _channel_range(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Each channel's largest magnitude (float32, at least a tiny positive number)."""
    a = np.abs(np.asarray(w, np.float32))
    r = a.max() if axis is None else np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).max(axis=1)
    return np.maximum(np.asarray(r, np.float32), np.float32(1e-8))


def initial_range(w: np.ndarray, axis: int | None, scale: np.ndarray, bits: int) -> float:
    """The layer's range, as a fraction of each channel's largest weight, that a plain quantizer
    with per-channel ``scale`` at ``bits`` bits uses (its median over the channels): the start of
    a learned range, so training begins where post-training rounding would be, not at min/max."""
    k = 2 ** (bits - 1) - 1
    return float(np.median(np.asarray(scale, np.float64).reshape(-1) * k / _channel_range(w, axis).astype(np.float64).reshape(-1)))


class UhlichQuantizer:
    """A layer's symmetric weight quantizer with learned step and range (see the module doc)."""

    def __init__(self, w: np.ndarray, axis: int | None, initial_bits: int, allowed: Sequence[int], initial_range: float = 1.0, full_range: bool = False) -> None:
        """``initial_range``: where the range starts, as a fraction of each channel's largest
        weight (1: min/max; below 4 bits a clipped range loses far less, see `initial_range`).
        ``full_range``: the codes run from ``-(k + 1)`` to ``k`` (all ``2^b`` of a ``b``-bit
        width, the target's ``low_bit_range = "full"``) instead of ``-k`` to ``k``."""
        import torch

        from qcompiler.quant.lsq import broadcast

        self.axis, self.allowed, self.full_range = axis, sorted(allowed), full_range
        self.range = _channel_range(w, axis)
        self._range_t = broadcast(torch.from_numpy(self.range), np.ndim(w), axis)
        k = 2 ** (initial_bits - 1) - 1
        q = min(max(float(initial_range), 1e-3), 1.0)
        self.log_q = torch.nn.Parameter(torch.tensor(math.log(q)))
        self.log_d = torch.nn.Parameter(torch.tensor(math.log(q / k)))

    def _d_q(self):
        import torch

        q = torch.exp(self.log_q)
        # Keep the width within the allowed ones: d between q / k_max and q / k_min.
        k_min, k_max = 2 ** (self.allowed[0] - 1) - 1, 2 ** (self.allowed[-1] - 1) - 1
        d = torch.minimum(torch.maximum(torch.exp(self.log_d), q / k_max), q / k_min)
        return d, q

    def quantize(self, w):
        """``w`` fake-quantized (straight-through rounding, clipped at ``q``): what the layer computes."""
        import torch

        from qcompiler.quant.lsq import round_ste

        d, q = self._d_q()
        x = w / self._range_t
        x = torch.maximum(torch.minimum(x, q), -(q + d) if self.full_range else -q)
        return round_ste(x / d) * d * self._range_t

    def continuous_bits(self):
        """``log2(q / d + 1) + 1`` as a differentiable tensor."""
        import torch

        d, q = self._d_q()
        return torch.log2(q / d + 1) + 1

    def bits(self):
        """The deployed width (the allowed width at or above the continuous one) forward,
        the continuous width's gradient backward."""
        b = self.continuous_bits()
        return b + (float(allowed_ceil(float(b.detach()), self.allowed)) - b).detach()

    def deployed_bits(self) -> int:
        return allowed_ceil(float(self.continuous_bits().detach()), self.allowed)

    def codes_and_scale(self, w, bits: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(int64 codes, per-channel scale, width) of ``w`` as `quantize` rounds it; at a
        narrower ``bits`` than it learned (a budget fix-up), the same range with a coarser step."""
        import torch

        bits = bits or self.deployed_bits()
        top = 2 ** (bits - 1) - 1
        with torch.no_grad():
            d, q = self._d_q()
            d = torch.maximum(d, q / top)
            x = torch.maximum(torch.minimum(w / self._range_t, q), -(q + d) if self.full_range else -q)
            codes = torch.round(x / d).numpy().astype(np.int64)
        return np.clip(codes, -top - 1 if self.full_range else -top, top), (self.range * float(d)).astype(np.float32), bits

    def freeze(self, bits: int) -> None:
        """Fix the width at ``bits`` (an allowed one): the step follows the range from now on."""
        self.allowed = [bits]

    def parameters(self) -> dict[str, object]:
        return {"log_step": self.log_d, "log_range": self.log_q}


class BitNetQuantizer:
    """A layer's integer width, moved by the sign of its gradient (BitNet's rule; see the module doc)."""

    def __init__(self, w: np.ndarray, axis: int | None, initial_bits: int, allowed: Sequence[int]) -> None:
        import torch

        from qcompiler.quant.lsq import broadcast

        self.axis, self.allowed = axis, sorted(allowed)
        self.range = _channel_range(w, axis)
        self._range_t = broadcast(torch.from_numpy(self.range), np.ndim(w), axis)
        # A float tensor holding an integer: autograd gives the loss's slope with respect to it.
        self.b = torch.tensor(float(allowed_ceil(initial_bits, self.allowed)), requires_grad=True)

    def quantize(self, w):
        from qcompiler.quant.lsq import round_ste

        top = 2 ** (self.b - 1) - 1
        x = (w / self._range_t).clamp(-1, 1)
        return round_ste(x * top) / top * self._range_t

    def bits(self):
        return self.b

    def deployed_bits(self) -> int:
        return round(float(self.b.detach()))

    def step(self) -> int:
        """Move ``b`` one allowed width against the sign of its accumulated gradient; reset the
        gradient. Returns the move (-1, 0 or +1)."""
        import torch

        g = 0.0 if self.b.grad is None else float(self.b.grad)
        self.b.grad = None
        current = self.allowed.index(self.deployed_bits())
        move = 0 if g == 0 else (-1 if g > 0 else 1)
        new = min(max(current + move, 0), len(self.allowed) - 1)
        with torch.no_grad():
            self.b.fill_(float(self.allowed[new]))
        return new - current

    def codes_and_scale(self, w, bits: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        import torch

        bits = bits or self.deployed_bits()
        top = 2 ** (bits - 1) - 1
        with torch.no_grad():
            codes = torch.round((w / self._range_t).clamp(-1, 1) * top).numpy().astype(np.int64)
        return codes, (self.range / top).astype(np.float32), bits

    def freeze(self, bits: int) -> None:
        """Fix the width at ``bits``: `step` no longer moves it."""
        import torch

        self.allowed = [bits]
        with torch.no_grad():
            self.b.fill_(float(bits))

    def parameters(self) -> dict[str, object]:
        return {}
