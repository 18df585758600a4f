"""Streaming calibration observers.

An observer is fed activation tensors one batch at a time during calibration and afterwards
answers the float range ``[lo, hi]`` that the tensor should be quantized to.  Memory never
grows with the number of samples: :class:`MinMaxObserver` keeps three scalars and the
histogram observers keep one fixed-size histogram, never the activations themselves.

Conventions shared by every observer:

* NaNs are ignored (they are not counted either); infinities raise :class:`ValueError`, because
  an infinite activation during calibration means the float model itself overflowed and any
  range chosen from it would be meaningless.
* Returned ranges always contain zero (``lo <= 0 <= hi``) so that zero, which padding and ReLU
  produce constantly, is exactly representable; they always satisfy ``hi > lo``: an observer
  that saw only zeros returns ``(0, 1e-8)``, or ``(-1e-8, 1e-8)`` when symmetric.
* ``symmetric=True`` returns ``(-t, t)``.
"""

from __future__ import annotations

import abc
import math

import numpy as np

__all__ = [
    "Observer",
    "MinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "make_observer",
]

_TINY_RANGE = 1e-8  # the range returned when only zeros were seen: any hi > lo is valid there
_MAX_COARSE_CANDIDATES = 256  # KL candidates in the coarse pass; refined around the best after
_KL_BLOCK = 64  # candidates evaluated per 2-D block, bounding temporary memory to ~1 MB/array
_MSE_GRID = 100  # clipping factors tried by the MSE search
_KL_EPS = 1e-4  # probability floor for Q where P > 0 but Q == 0 (MXNet uses the same value)


def _finite_values(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Flatten ``x`` (no copy when possible) without NaNs; return it with its min and max.

    Reject non-real dtypes and infinities. Float data keeps its dtype: calibration tensors are
    large, and a float64 copy would double the memory traffic of every pass over them.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"observers need real numeric data, got dtype {arr.dtype}")
    values = arr.reshape(-1) if arr.dtype.kind == "f" else arr.astype(np.float64).reshape(-1)
    if values.size == 0:
        return values, 0.0, 0.0
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or inf somewhere: the slow path
        values = values[~np.isnan(values)]
        if values.size == 0:
            return values, 0.0, 0.0
        if np.isinf(values).any():
            raise ValueError("calibration data contains inf; the float model overflowed")
        lo, hi = float(values.min()), float(values.max())
    return values, lo, hi


def _check_levels(levels: int) -> None:
    if int(levels) != levels or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")


def _finalize(lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    """Widen ``[lo, hi]`` to contain zero, symmetrise if asked, never return an empty range."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        t = max(-lo, hi)
        return (-t, t) if t > 0 else (-_TINY_RANGE, _TINY_RANGE)
    return (lo, hi) if hi > lo else (0.0, _TINY_RANGE)


def _pow2_ceil(v: float) -> float:
    """Smallest power of two >= v (v > 0). Powers of two keep every bin edge exact in float."""
    mantissa, exponent = math.frexp(v)  # v = mantissa * 2**exponent, mantissa in [0.5, 1)
    return v if mantissa == 0.5 else math.ldexp(1.0, exponent)


class Observer(abc.ABC):
    """Sees activation batches one at a time; answers the float range to quantize.

    The base class tracks the element count and the exact min/max; subclasses add whatever
    statistics they need in :meth:`_observe` and choose the range in :meth:`range`.
    """

    def __init__(self) -> None:
        self._count = 0
        self._min = math.inf
        self._max = -math.inf

    def update(self, x: np.ndarray) -> None:
        """Fold one batch (any shape, any real dtype) into the statistics.

        NaNs are skipped; an inf raises :class:`ValueError` and leaves the observer unchanged.
        """
        values, lo, hi = _finite_values(x)
        if values.size == 0:
            return
        self._observe(values, lo, hi)
        self._count += int(values.size)
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)

    def _observe(self, values: np.ndarray, lo: float, hi: float) -> None:
        """Hook for subclasses: ``values`` is a non-empty, finite, 1-D float array with min ``lo`` and max ``hi``."""

    @abc.abstractmethod
    def range(self, *, levels: int, symmetric: bool) -> tuple[float, float]:
        """Return ``(lo, hi)`` with ``lo <= 0 <= hi`` and ``hi > lo``.

        ``levels`` is the number of levels of the target integer type (256 for int8/uint8);
        ``symmetric=True`` asks for ``lo == -hi``.  Raises :class:`RuntimeError` before any data.
        """

    @property
    def count(self) -> int:
        """Number of (non-NaN) elements seen so far."""
        return self._count

    def state_bytes(self) -> int:
        """Bytes of numeric state held; constant in the number of batches seen."""
        return 3 * 8  # count, min, max

    def _require_data(self) -> None:
        if self._count == 0:
            raise RuntimeError(f"{type(self).__name__} has observed no data yet")


class MinMaxObserver(Observer):
    """Range = exact running [min, max]; symmetric -> (-m, m) with m = max(|min|, |max|)."""

    def range(self, *, levels: int, symmetric: bool) -> tuple[float, float]:
        _check_levels(levels)
        self._require_data()
        return _finalize(self._min, self._max, symmetric)


class HistogramObserver(Observer):
    """Base for observers that choose a range from a fixed-size histogram.

    The histogram covers ``[-R, R]`` with ``2 * bins`` equal bins (``bins`` per side, so zero
    is always a bin edge).  ``R`` is the first non-zero batch's ``max|x|`` rounded up to a power
    of two and doubles whenever a batch exceeds it.  A doubling merges adjacent bin pairs into
    the middle half and zero-fills the outer quarters: since ``bins`` is even no pair straddles
    zero, and since ``R`` is a power of two the old edges are exactly new edges, so the counts
    are exactly what binning all data over the final edges would give.  Until a non-zero value
    arrives ``R`` is 0 and zeros are counted in the bin ``[0, w)`` they belong to for any ``R``.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if int(bins) != bins or bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even integer >= 2 (bins per side), got {bins!r}")
        self._bins = int(bins)
        self._hist = np.zeros(2 * self._bins, dtype=np.int64)
        self._radius = 0.0
        # Exact zeros are error-free under every candidate range (zero is always representable),
        # so the entropy and MSE searches leave them out instead of smearing them over [0, w).
        self._zeros = 0

    @property
    def bins(self) -> int:
        """Bins per side of zero."""
        return self._bins

    @property
    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the counts (``2 * bins``) and their ``2 * bins + 1`` edges over ``[-R, R]``."""
        edges = np.linspace(-self._radius, self._radius, 2 * self._bins + 1)
        return self._hist.copy(), edges

    def state_bytes(self) -> int:
        return super().state_bytes() + self._hist.nbytes + 3 * 8  # + bins, radius, zeros

    def _observe(self, values: np.ndarray, lo: float, hi: float) -> None:
        self._zeros += int(np.count_nonzero(values == 0))
        peak = max(-lo, hi)
        if peak > self._radius:
            if self._radius == 0.0:
                self._radius = _pow2_ceil(peak)
            else:
                self._grow(peak)
        if self._radius == 0.0:  # only zeros so far
            self._hist[self._bins] += values.size
            return
        # Bin index = floor(x / width) + bins. Multiplying by bins / R (a power of two when bins
        # is) is exact in any float precision, and so is floor: no value lands in a neighbour bin.
        scaled = np.multiply(values, self._bins / self._radius, dtype=values.dtype if values.dtype.itemsize >= 4 else np.float32)
        np.floor(scaled, out=scaled)
        idx = scaled.astype(np.intp)
        idx += self._bins
        np.minimum(idx, self._hist.size - 1, out=idx)  # x == R belongs to the last (closed) bin
        self._hist += np.bincount(idx, minlength=self._hist.size)

    def _grow(self, peak: float) -> None:
        """Double R until it covers ``peak``, merging bin pairs exactly at each doubling."""
        doublings = 0
        while self._radius < peak:
            self._radius *= 2.0
            doublings += 1
        # After log2(2*bins) merges all mass sits in the two bins next to zero; more are no-ops.
        for _ in range(min(doublings, int(math.log2(self._hist.size)) + 1)):
            pairs = self._hist.reshape(self._bins, 2).sum(axis=1)
            self._hist[:] = 0
            self._hist[self._bins // 2 : self._bins // 2 + self._bins] = pairs

    def _width(self) -> float:
        return self._radius / self._bins

    def _positive_side(self) -> np.ndarray:
        """Counts of the ``bins`` bins covering ``[0, R]``."""
        return self._hist[self._bins :].copy()

    def _folded(self) -> np.ndarray:
        """Histogram of ``|x|`` over ``[0, R]``: negative bin j mirrors onto bin ``bins-1-j``."""
        return self._hist[self._bins :] + self._hist[: self._bins][::-1]


def _quantile(counts: np.ndarray, start: float, width: float, q: float) -> float:
    """Value at cumulative fraction ``q`` of a histogram, interpolating linearly inside a bin."""
    cum = np.cumsum(counts)
    total = cum[-1]
    target = q * total
    if target >= total:  # q == 1: right edge of the last non-empty bin
        return start + (np.flatnonzero(counts)[-1] + 1) * width
    # side="right" lands on the first bin whose cumulative count exceeds the target, which is
    # therefore non-empty, so the division below is safe.
    idx = int(np.searchsorted(cum, target, side="right"))
    before = cum[idx - 1] if idx else 0
    return start + (idx + (target - before) / counts[idx]) * width


class PercentileObserver(HistogramObserver):
    """Clips the tails: range = [(100-p)-th, p-th] percentile, clamped to the exact [min, max].

    Symmetric ranges use the p-th percentile of ``|x|``.  ``levels`` does not matter here.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def range(self, *, levels: int, symmetric: bool) -> tuple[float, float]:
        _check_levels(levels)
        self._require_data()
        if self._radius == 0.0:
            return _finalize(0.0, 0.0, symmetric)
        q, w = self.percentile / 100.0, self._width()
        if symmetric:
            t = min(_quantile(self._folded(), 0.0, w, q), max(-self._min, self._max))
            return _finalize(-t, t, True)
        hi = _quantile(self._hist, -self._radius, w, q)
        lo = _quantile(self._hist, -self._radius, w, 1.0 - q)
        clamp = lambda v: min(max(v, self._min), self._max)  # noqa: E731
        return _finalize(clamp(lo), clamp(hi), False)


def _kl_divergences(counts: np.ndarray, candidates: np.ndarray, nq: int) -> np.ndarray:
    """KL(P_i || Q_i) for each candidate bin count ``i`` (TensorRT's entropy calibration).

    ``P_i`` is ``counts[:i]`` with the clipped mass ``sum(counts[i:])`` added to its last bin.
    ``Q_i`` quantizes ``counts[:i]`` into ``nq`` chunks (bin j -> chunk ``j*nq // i``) and
    spreads each chunk's mass evenly over the bins where ``P_i`` is non-zero (zeros stay zero).
    Where ``P_i > 0`` but the whole chunk is empty, ``Q_i`` gets a floor of ``_KL_EPS`` as in
    MXNet's smoothing: without it, clipping just past the bulk of the data (into empty bins)
    would score an infinite divergence and outliers could never be clipped.
    All candidates of a block are done at once on a (candidates x bins) grid, using prefix sums
    so chunk totals need no loop.  Requires ``nq <= i <= len(counts)``.
    """
    counts = counts.astype(np.float64)
    n, total = counts.size, counts.sum()
    prefix = np.concatenate(([0.0], np.cumsum(counts)))
    nonempty_prefix = np.concatenate(([0], np.cumsum(counts > 0)))
    j = np.arange(n)[None, :]
    out = np.empty(len(candidates))
    for s in range(0, len(candidates), _KL_BLOCK):
        cand = np.asarray(candidates[s : s + _KL_BLOCK], dtype=np.int64)
        rows, i = np.arange(len(cand)), cand[:, None]
        inside = j < i
        p = np.where(inside, counts, 0.0)
        p[rows, cand - 1] += total - prefix[cand]
        chunk = (j * nq) // i
        first = np.minimum(-((-chunk * i) // nq), n)  # ceil(chunk*i/nq): chunk's first bin
        stop = np.minimum(-((-(chunk + 1) * i) // nq), n)
        chunk_mass = prefix[stop] - prefix[first]
        chunk_nonempty = nonempty_prefix[stop] - nonempty_prefix[first]
        # Bin i-1 may be empty in counts but hold the clipped mass in P; it lies in the last chunk.
        became_nonempty = (counts[cand - 1] == 0) & (p[rows, cand - 1] > 0)
        chunk_nonempty += (chunk == nq - 1) & became_nonempty[:, None]
        q = np.where(inside & (p > 0), chunk_mass / np.maximum(chunk_nonempty, 1), 0.0)
        kept = prefix[cand][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            qn = np.where(kept > 0, q / kept, 0.0)
            pn = p / total
            qn = np.where((pn > 0) & (qn == 0), _KL_EPS, qn)
            terms = np.where(pn > 0, pn * np.log(pn / qn), 0.0)
        out[s : s + len(cand)] = terms.sum(axis=1)
    return out


def _kl_best_bins(counts: np.ndarray, nq: int) -> int:
    """Number of leading bins to keep that minimises KL: coarse strided pass, then refine."""
    nonempty = np.flatnonzero(counts)
    if nonempty.size == 0:
        return counts.size
    n = int(nonempty[-1]) + 1  # a threshold past the data's end clips nothing: same as i == n
    counts = counts[:n]
    if n <= nq:  # the histogram is coarser than the quantizer: nothing to gain by clipping
        return n
    stride = max(1, math.ceil((n - nq + 1) / _MAX_COARSE_CANDIDATES))
    coarse = np.unique(np.append(np.arange(nq, n + 1, stride), n))
    kl = _kl_divergences(counts, coarse, nq)
    best = int(coarse[np.argmin(kl)])
    fine = np.arange(max(nq, best - stride + 1), min(n, best + stride - 1) + 1)
    kl_fine = _kl_divergences(counts, fine, nq)
    return int(fine[np.argmin(kl_fine)])


class EntropyObserver(HistogramObserver):
    """Threshold minimising the KL divergence between the clipped and quantized distributions.

    * ``min >= 0`` and asymmetric (e.g. post-ReLU): KL over the positive side with ``levels``
      quantization bins; range ``(0, t)``.
    * symmetric: KL over the ``|x|`` histogram with ``levels // 2`` bins; range ``(-t, t)``.
    * asymmetric with negative data: the ``|x|`` threshold as above, intersected with the exact
      ``[min, max]``; a per-side search would need to split ``levels`` between the sides before
      knowing the thresholds, and this keeps TensorRT's well-tested behaviour.

    Exact zeros are left out of the search (they quantize without error at any threshold).
    """

    def range(self, *, levels: int, symmetric: bool) -> tuple[float, float]:
        _check_levels(levels)
        self._require_data()
        if self._radius == 0.0:
            return _finalize(0.0, 0.0, symmetric)
        if symmetric or self._min < 0:
            counts, nq, peak = self._folded(), levels // 2, max(-self._min, self._max)
        else:
            counts, nq, peak = self._positive_side(), levels, self._max
        counts[0] -= self._zeros
        t = min(_kl_best_bins(counts, nq) * self._width(), peak)
        if symmetric:
            return _finalize(-t, t, True)
        return _finalize(max(self._min, -t), min(self._max, t), False)


class MSEObserver(HistogramObserver):
    """Range minimising the expected squared quantize-dequantize error (rounding + clipping).

    Candidates shrink the exact range by ``alpha`` in (0, 1] (100 values): ``alpha*(lo0, hi0)``
    with ``(lo0, hi0)`` the exact min/max widened to contain zero (so ``lo`` stays 0 for
    non-negative data), or ``(-alpha*m, alpha*m)`` when symmetric. For asymmetric ranges of
    signed data each end is then refined on its own (coordinate descent), since skewed data
    wants unequal clipping.  Each histogram bin is
    represented by its centre (clamped to the exact [min, max]); the error of every candidate
    on every non-empty bin is one 2-D array.  The quantizer matches the affine scheme:
    ``scale = (hi-lo)/(levels-1)``, ``zp = clip(round(-lo/scale))``, ``q in [0, levels-1]``.
    """

    def range(self, *, levels: int, symmetric: bool) -> tuple[float, float]:
        _check_levels(levels)
        self._require_data()
        if self._radius == 0.0:
            return _finalize(0.0, 0.0, symmetric)
        counts = self._hist.astype(np.float64)
        counts[self._bins] -= self._zeros
        centres = -self._radius + (np.arange(counts.size) + 0.5) * self._width()
        keep = counts > 0
        c = np.clip(centres[keep], self._min, self._max)[None, :]
        weight = counts[keep][None, :]
        if symmetric:
            m = max(-self._min, self._max)
            lo0, hi0 = -m, m
        else:
            lo0, hi0 = min(self._min, 0.0), max(self._max, 0.0)
        def errors(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
            scale = (hi - lo) / (levels - 1)
            zp = np.clip(np.round(-lo / scale), 0, levels - 1)
            q = np.clip(np.round(c / scale) + zp, 0, levels - 1)
            return (weight * (c - (q - zp) * scale) ** 2).sum(axis=1)

        # Descending, so argmin prefers the widest range when candidates tie.
        alpha = np.linspace(1.0, 1.0 / _MSE_GRID, _MSE_GRID)[:, None]
        lo, hi = alpha * lo0, alpha * hi0
        best = int(np.argmin(errors(lo, hi)))
        best_lo, best_hi = float(lo[best, 0]), float(hi[best, 0])
        if not symmetric and lo0 < 0 < hi0:
            # Signed data is often skewed: shrinking both ends by one factor clips the short side
            # too early. Refine each end with the other held (two rounds of coordinate descent).
            for _ in range(2):
                his = alpha * hi0
                best_hi = float(his[int(np.argmin(errors(np.full_like(his, best_lo), his))), 0])
                los = alpha * lo0
                best_lo = float(los[int(np.argmin(errors(los, np.full_like(los, best_hi)))), 0])
        return _finalize(best_lo, best_hi, symmetric)


_METHODS = ("entropy", "minmax", "mse", "percentile")


def make_observer(method: str, *, percentile: float = 99.99, bins: int = 2048) -> Observer:
    """Build the observer for a calibration ``method``: one of minmax, percentile, entropy, mse.

    ``percentile`` only applies to ``"percentile"``; ``bins`` (per side) to the histogram ones.
    """
    if method == "minmax":
        return MinMaxObserver()
    if method == "percentile":
        return PercentileObserver(percentile, bins=bins)
    if method == "entropy":
        return EntropyObserver(bins=bins)
    if method == "mse":
        return MSEObserver(bins=bins)
    raise ValueError(
        f"unknown calibration method {method!r}; expected one of: " + ", ".join(_METHODS)
    )
