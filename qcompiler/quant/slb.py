"""Searching for low-bit weights (SLB, Yang et al., NeurIPS 2020): each weight a learned choice
among its layer's few levels.

Every weight ``w`` of a layer keeps one logit per level ``v`` of the layer's low-bit set (the
integer codes ``lo..hi`` of its quantizer times its channel's scale). Training uses the
expectation ``scale * sum_v softmax(t * a)_v * v`` and the sharpness ``t`` rises on a schedule
(the paper: exponentially from 0.01 to 10 over training), so the distribution narrows towards one
level per weight and the gap to the hard ``argmax`` used at inference closes. The logits start
from each weight's distance to the levels, ``a_v = -c (w / scale - v)^2 / t_start``, so the first
argmax is exactly plain rounding and the first expectation is close to the pretrained weight
(``c``, the initial sharpness, sets how close): training starts from the pretrained network, not
from scratch. The logits are stored times ``t_start`` (values of order one, whatever the
schedule), so an optimizer's step size means the same thing for every ``t_start``.

Numerics on tensors only; `passes/slb.py` runs the training on the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Schedule = Literal["exp", "cos", "linear"]


def sharpness(schedule: Schedule, step: int, total_steps: int, start: float, end: float) -> float:
    """The softmax sharpness ``t`` at 0-based ``step`` of ``total_steps`` (``start`` at the first
    step, ``end`` at the last): ``exp`` geometric, ``cos`` half a cosine, ``linear`` a line."""
    f = step / max(total_steps - 1, 1)
    f = min(max(f, 0.0), 1.0)
    if schedule == "exp":
        return start * (end / start) ** f
    if schedule == "cos":
        return start + (end - start) * 0.5 * (1 - math.cos(math.pi * f))
    if schedule == "linear":
        return start + (end - start) * f
    raise ValueError(f"unknown schedule '{schedule}'")


@dataclass
class LevelChoice:
    """One layer's weights as distributions over its levels.

    ``levels``: the integer codes a weight may take (ascending); ``logits``: a torch parameter of
    shape ``(len(levels), *weight.shape)`` (levels first: a softmax over the leading axis is 2-3x
    faster on CPU than over a short trailing one); ``scale``: a torch parameter, one step per channel
    along ``axis`` (None: one for the layer); ``zero_point`` subtracted from the codes.
    """

    levels: np.ndarray
    logits: object
    scale: object
    zero_point: float
    axis: int | None
    t_start: float

    @classmethod
    def start(cls, w: np.ndarray, levels: np.ndarray, scale: np.ndarray, zero_point: float, axis: int | None, t_start: float,
              initial_sharpness: float = 4.0) -> LevelChoice:
        """Logits whose argmax is ``w`` rounded to the nearest level and whose softmax at
        sharpness ``t_start`` is ``softmax(-initial_sharpness * distance^2)`` (4: a weight a third
        of a step from its nearest level puts 83 % on it)."""
        import torch

        from qcompiler.quant.lsq import broadcast

        s = broadcast(torch.from_numpy(np.asarray(scale, np.float32)), w.ndim, axis)
        x = torch.from_numpy(np.asarray(w, np.float32)) / s + zero_point
        v = torch.from_numpy(np.asarray(levels, np.float32))
        logits = -initial_sharpness * (x.unsqueeze(0) - v.reshape(-1, *([1] * x.dim()))) ** 2
        return cls(np.asarray(levels), torch.nn.Parameter(logits.contiguous()), torch.nn.Parameter(torch.from_numpy(np.asarray(scale, np.float32).copy())),
                   float(zero_point), axis, float(t_start))

    def _values(self):
        import torch

        from qcompiler.quant.lsq import broadcast

        ndim = self.logits.dim() - 1
        values = torch.from_numpy(self.levels.astype(np.float32)) - self.zero_point
        return values.reshape(-1, *([1] * ndim)), broadcast(self.scale, ndim, self.axis)

    def expected(self, t: float):
        """The weight as the expectation of its levels under ``softmax(t * logits)`` (differentiable)."""
        import torch

        values, s = self._values()
        p = torch.softmax(self.logits * (t / self.t_start), dim=0)
        return (p * values).sum(0) * s

    def hard(self):
        """The weight at each logit's argmax (the inference weight; no gradient)."""
        import torch

        with torch.no_grad():
            values, s = self._values()
            return values.reshape(-1)[self.logits.argmax(0)] * s

    def codes(self) -> np.ndarray:
        """The integer code of each weight's argmax level (int64)."""
        return self.levels[self.logits.detach().argmax(0).numpy()].astype(np.int64)

    def confidence(self, t: float) -> float:
        """Mean probability of each weight's argmax level at sharpness ``t`` (1.0: all hard)."""
        import torch

        with torch.no_grad():
            return float(torch.softmax(self.logits * (t / self.t_start), dim=0).max(0).values.mean())
