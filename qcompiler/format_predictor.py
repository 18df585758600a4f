"""Hill et al.'s accuracy predictor: top-1 from the R^2 of the last layer's outputs on a few inputs.

Hill et al. ran each candidate format on 10 inputs, took the coefficient of determination R^2
between the custom and the float last-layer activations, and mapped it to normalized accuracy
(the candidate's top-1 over the float model's) with a curve fitted on measured designs. Here the
lost fraction of top-1 falls exponentially with the "nines" of R^2, ``x = -log10(1 - R^2)``
(R^2 = 0.99 is x = 2), as an error rate falls with signal-to-noise:

    log10(1 - normalized accuracy) = intercept + slope * x        (slope < 0)

fitted by least squares to the measured designs that lost some top-1 but kept at least half of it
(a design that lost none says only that its loss is below one sample; one that lost most has hit
chance level, where the line no longer holds), on other models: the
bench fits it leave-one-model-out (every model predicted by a curve that never saw it) and
writes the curve fitted on all of them as the built-in default (``predictors/hill_r2.json``,
`fit_file`), which ``search-formats{strategy=predictor}`` uses unless given ``predictor=FILE``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qcompiler.errors import QCError

#: The curve fitted on every model of bench/formats.py (its command regenerates it).
BUILTIN = Path(__file__).resolve().parent / "predictors" / "hill_r2.json"
#: What a fitted curve's file says it is.
KIND = "hill-r2-exponential"
#: R^2 closer to 1 than this is "exact" (x capped): float32 rounding makes larger x noise.
_MAX_NINES = 9.0


def nines(r2: float | np.ndarray) -> np.ndarray:
    """``-log10(1 - R^2)``, capped at 9 (R^2 = 1) and 0 below R^2 = 0 (worse than a constant)."""
    r2 = np.asarray(r2, np.float64)
    gap = np.clip(1.0 - np.nan_to_num(r2, nan=0.0), 10.0**-_MAX_NINES, 1.0)
    return -np.log10(gap)


@dataclass(frozen=True)
class AccuracyPredictor:
    """The lost fraction of top-1 as a power of ten linear in `nines` of R^2 (see the module docstring)."""

    intercept: float
    slope: float
    #: Which models' measurements it was fitted on, and how many points.
    fitted_on: list[str] = field(default_factory=list)
    points: int = 0

    def normalized_accuracy(self, r2: float | np.ndarray) -> np.ndarray:
        lost = np.minimum(10.0 ** (self.intercept + self.slope * nines(r2)), 1.0)
        return 1.0 - lost

    def drop(self, r2: float, float_top1: float) -> float:
        """Predicted top-1 drop in points for a candidate whose outputs have ``r2``."""
        return float(float_top1 * (1.0 - self.normalized_accuracy(r2)))

    @classmethod
    def fit(cls, r2: np.ndarray, normalized: np.ndarray, fitted_on: list[str]) -> AccuracyPredictor:
        """Least-squares fit of log10(lost fraction) on nines to the measured points that lost
        some top-1 and kept at least half of it."""
        x, lost = nines(r2), 1.0 - np.asarray(normalized, np.float64)
        used = (lost > 0) & (lost <= 0.5)
        if int(used.sum()) < 3:
            raise QCError(f"fitting the accuracy predictor needs at least 3 measured designs that lost some top-1 but kept half, got {int(used.sum())}", option="predictor")
        design = np.vstack([np.ones(int(used.sum())), x[used]]).T
        (intercept, slope), *_ = np.linalg.lstsq(design, np.log10(lost[used]), rcond=None)
        if slope >= 0:
            raise QCError("the fitted accuracy predictor does not improve with R^2 (its slope is not negative): the points are too few or too noisy", option="predictor")
        return cls(float(intercept), float(slope), list(fitted_on), int(used.sum()))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": KIND, **asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None) -> AccuracyPredictor:
        """A fitted curve from ``path`` (default: the built-in one); a QCError naming the file otherwise."""
        path = Path(path) if path else BUILTIN
        try:
            data = json.loads(path.read_text())
            if data.get("kind") != KIND:
                raise ValueError(f"not a fitted predictor (its 'kind' is not {KIND})")
            return cls(float(data["intercept"]), float(data["slope"]), list(data.get("fitted_on", [])), int(data.get("points", 0)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QCError(f"cannot read the accuracy predictor: {e}", file=str(path), option="predictor") from None
