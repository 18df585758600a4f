"""A resource budget as written on the command line (``size=0.6``, ``bits=4.5``, ...): what
`assign-precision` chooses widths under and `learn-bits` trains towards."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcompiler.errors import QCError

#: Budget kinds and what their number means. Fractions are of the model with every weight at the
#: target's full weight width (int8 on ort-cpu), measured in the same resource.
BUDGET_KINDS = {
    "size": "FRACTION of the full-width (int8) weight bytes",
    "bits": "AVERAGE bits per weight",
    "bops": "FRACTION of the full-width model's bit operations (MACs x weight bits x activation bits)",
    "latency": "FRACTION of the full-width model's latency predicted from the target's [cost.mac]",
}
#: Unit of each kind's resource, for messages and the report.
_UNITS = {"size": "weight bits", "bits": "weight bits", "bops": "bit-ops", "latency": "cost units"}


@dataclass(frozen=True)
class Budget:
    kind: str
    number: float

    @classmethod
    def parse(cls, text: str, *, pass_name: str = "assign-precision", kinds: tuple[str, ...] = tuple(BUDGET_KINDS)) -> Budget:
        """``size=0.6``, ``bits=4.5``, ``bops=0.4`` or ``latency=0.8`` (those of ``kinds``);
        a QCError naming ``pass_name``'s budget option otherwise."""
        kind, eq, value = text.partition("=")
        accepted = ", ".join(f"{k}={v}" for k, v in BUDGET_KINDS.items() if k in kinds)
        if not eq or kind not in kinds:
            raise QCError(f"'{text}' is not a budget (accepted: {accepted})", pass_name=pass_name, option="budget")
        try:
            number = float(value)
        except ValueError:
            raise QCError(f"'{text}': '{value}' is not a number (accepted: {accepted})", pass_name=pass_name, option="budget") from None
        if not (number > 0 and math.isfinite(number)):
            raise QCError(f"the budget must be a positive number, got {number} (accepted: {accepted})", pass_name=pass_name, option="budget")
        return cls(kind, number)

    def limit(self, full_width: float, parameters: np.ndarray) -> float:
        """The budget in the resource's unit, given the full-width model's total of it."""
        if self.kind == "bits":
            return self.number * float(parameters.sum())
        return self.number * full_width
