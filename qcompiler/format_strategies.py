"""Ways to find the cheapest single format for a whole network that meets an accuracy goal.

Every strategy gets the candidates in increasing modelled cost and returns the cheapest one it
found meeting the goal, measured as the written model runs (`FormatEvaluator.measure`), with
how many full evaluations (every held-out sample, a session each) and probes (a few samples in
the shared probe session, `FormatEvaluator.probe`) it spent:

- ``exhaustive``: every candidate measured in full (the reference the others are checked against;
  Hill et al.'s reviewers' proposal, run in parallel);
- ``binary``: the candidates split into chains that differ in one width (`format_chain`: integer
  bits, fixed point's fraction bits, a float's mantissa bits at each exponent width); along a chain
  more bits round no worse, so a binary search finds each chain's narrowest member that meets the
  goal; the chains are searched side by side, one candidate of each per round;
- ``halving``: successive halving: the candidates probed cheapest first on few samples (64) until
  one meets the goal beyond the sampling error of that many samples (every costlier one can only
  lose to it), those that miss it beyond that error dropped, the rest probed on four times as many,
  and so on; the survivors measured in full, cheapest first, a batch of ``workers`` at a time,
  until one meets;
- ``predictor``: Hill et al.'s: candidates probed cheapest first on ``probe-samples`` (10) inputs,
  each one's top-1 predicted from the R^2 of its outputs (`AccuracyPredictor`; for an SQNR goal the
  probe's SQNR) until one is predicted to meet; that one is measured in full, then refined one bit
  at a time (`one_bit_neighbours`: narrower while it meets, wider while it misses), at most 3 full
  evaluations (with two or more workers the guess and its narrower neighbour side by side); a
  refinement step that misses beyond three standard errors on a 256-sample probe (or already on
  its 10-input one) is not measured in full (it cannot be the answer). Before the first full
  evaluation the steps two or more bits narrower than the guess are screened so, nearest first:
  when one may meet, the walk starts at the narrowest that may (with its wider neighbour beside
  it), not at the guess, so a curve that guesses wide costs screens instead of full evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from qcompiler.format_predictor import AccuracyPredictor
from qcompiler.format_search import FormatEvaluator, Measurement
from qcompiler.quant.formats import NumberFormat, format_chain, one_bit_neighbours

Strategy = Literal["exhaustive", "binary", "halving", "predictor"]
STRATEGIES: tuple[str, ...] = ("exhaustive", "binary", "halving", "predictor")
#: The predictor's refinement spends at most this many full evaluations (the issue's bar).
PREDICTOR_FULL_EVALUATIONS = 3
#: A refinement step is first probed on this many samples; one that misses the goal by more than
#: `SCREEN_SIGMAS` / 2 times `Goal.sampling_error` (three standard errors) there is not measured in full.
SCREEN_SAMPLES = 256
SCREEN_SIGMAS = 3.0


@dataclass(frozen=True)
class Goal:
    """An SQNR floor (dB, 0: none) and a top-1 drop ceiling (points, negative: none)."""

    min_sqnr: float
    max_drop: float
    #: The float model's top-1 on the first n held-out samples (None without labels).
    float_top1_on: Callable[[int | None], float | None]

    def margin(self, m: Measurement) -> float:
        """How far ``m`` is above the goal, in the goal's units (dB or points; the smaller of two);
        negative: it misses."""
        margins = []
        if self.min_sqnr > 0:
            margins.append(m.sqnr_db - self.min_sqnr)
        reference = self.float_top1_on(m.samples or None)
        if self.max_drop >= 0 and m.top1 is not None and reference is not None:
            margins.append(self.max_drop - (reference - m.top1))
        return min(margins) if margins else math.inf

    def meets(self, m: Measurement) -> bool:
        return not m.failed and self.margin(m) >= 0

    def sampling_error(self, m: Measurement, total: int) -> float:
        """What ``m``'s margin may be off by because it ran on ``m.samples`` of ``total`` samples:
        two standard errors of a top-1 drop (binomial, the disagreeing fraction at least 2 %),
        and for SQNR 1 dB scaled by sqrt(total / samples) (a noise power's spread), 0 on all samples."""
        n = max(m.samples, 1)
        if n >= total:
            return 0.0
        errors = []
        if self.min_sqnr > 0:
            errors.append(min(1.0 * math.sqrt(total / n), 6.0))
        if self.max_drop >= 0 and m.top1 is not None:
            q = max(0.02, (100.0 - m.top1) / 100.0)
            errors.append(2 * 100.0 * math.sqrt(q * (1 - q) / n))
        return max(errors) if errors else 0.0


@dataclass
class Outcome:
    """What a strategy found: the cheapest candidate it measured in full that meets the goal (None:
    none did; ``best`` is then the most accurate one it measured), and what it spent."""

    strategy: str
    choice: NumberFormat | None
    measurement: Measurement | None
    best: tuple[NumberFormat, Measurement] | None
    probes: int
    seconds: float
    #: Every measurement in order: (format name, samples, full?, SQNR, top-1, R^2, met?).
    trail: list[dict] = field(default_factory=list)
    #: predictor: the format the curve predicted before refinement.
    predicted: NumberFormat | None = None
    #: Every candidate measured in full, with its measurement.
    measured: dict[NumberFormat, Measurement] = field(default_factory=dict)

    @property
    def full_evaluations(self) -> int:
        return len(self.measured)


class _Run:
    """The bookkeeping every strategy shares: measurements, counts, the trail."""

    def __init__(self, name: str, evaluator: FormatEvaluator, candidates: list[NumberFormat], goal: Goal) -> None:
        self.name, self.evaluator, self.goal = name, evaluator, goal
        self.rank = {f: i for i, f in enumerate(candidates)}  # by increasing cost
        self.full: dict[NumberFormat, Measurement] = {}
        self.probes = 0
        self.trail: list[dict] = []
        self.start = time.perf_counter()
        self.total = evaluator.data.num_samples

    def _note(self, fmt: NumberFormat, m: Measurement) -> None:
        self.trail.append({"format": fmt.name, "samples": m.samples, "full": m.full, "sqnr_db": round(m.sqnr_db, 3),
                           "top1": None if m.top1 is None else round(m.top1, 3), "r2": None if math.isnan(m.r2) else round(m.r2, 6),
                           "met": self.goal.meets(m) if m.full else None})

    def measure(self, formats: list[NumberFormat]) -> list[Measurement]:
        """Full evaluations (as run, every held-out sample), side by side on the workers; each format once."""
        new = [f for f in dict.fromkeys(formats) if f not in self.full]
        layers = self.evaluator.layers
        for fmt, m in zip(new, self.evaluator.measure_many([{layer.weight: fmt for layer in layers} for fmt in new])):
            self.full[fmt] = m
            self._note(fmt, m)
        return [self.full[f] for f in formats]

    def probe(self, fmt: NumberFormat, samples: int) -> Measurement:
        m = self.evaluator.probe({layer.weight: fmt for layer in self.evaluator.layers}, samples)
        self.probes += 1
        self._note(fmt, m)
        return m

    def outcome(self, predicted: NumberFormat | None = None) -> Outcome:
        meeting = [f for f, m in self.full.items() if self.goal.meets(m)]
        choice = min(meeting, key=self.rank.__getitem__) if meeting else None
        best = max(self.full.items(), key=lambda fm: (self.goal.margin(fm[1]), -self.rank.get(fm[0], 0))) if self.full else None
        return Outcome(self.name, choice, self.full.get(choice) if choice else None, best, self.probes,
                       round(time.perf_counter() - self.start, 3), self.trail, predicted, dict(self.full))


def exhaustive(evaluator: FormatEvaluator, candidates: list[NumberFormat], goal: Goal) -> Outcome:
    run = _Run("exhaustive", evaluator, candidates, goal)
    run.measure(candidates)
    return run.outcome()


def binary(evaluator: FormatEvaluator, candidates: list[NumberFormat], goal: Goal) -> Outcome:
    run = _Run("binary", evaluator, candidates, goal)
    chains: dict[tuple, list[NumberFormat]] = {}
    for fmt in candidates:
        chains.setdefault(format_chain(fmt), []).append(fmt)
    for members in chains.values():
        members.sort(key=lambda f: (f.bits, run.rank[f]))
    bounds = {key: [0, len(members) - 1] for key, members in chains.items()}
    while bounds:
        mids = {key: (lo + hi) // 2 for key, (lo, hi) in bounds.items()}
        cheapest = min((run.rank[f] for f, m in run.full.items() if goal.meets(m)), default=None)
        # A chain whose midpoint costs more than a candidate already met can only lose: skip it.
        asked = {key: chains[key][mid] for key, mid in mids.items() if cheapest is None or run.rank[chains[key][mid]] < cheapest}
        for key in set(mids) - set(asked):
            bounds[key][1] = mids[key] - 1
        for (key, fmt), m in zip(asked.items(), run.measure(list(asked.values()))):
            if goal.meets(m):
                bounds[key][1] = mids[key] - 1
            else:
                bounds[key][0] = mids[key] + 1
        bounds = {key: b for key, b in bounds.items() if b[0] <= b[1]}
    return run.outcome()


def halving(evaluator: FormatEvaluator, candidates: list[NumberFormat], goal: Goal, *, first_rung: int = 64) -> Outcome:
    run = _Run("halving", evaluator, candidates, goal)
    alive = list(candidates)
    n = min(first_rung, run.total)
    while n < run.total and len(alive) > max(evaluator.workers, 1):
        probed: dict[NumberFormat, Measurement] = {}
        for fmt in alive:  # cheapest first
            m = probed[fmt] = run.probe(fmt, n)
            if goal.margin(m) >= goal.sampling_error(m, run.total):
                break  # meets beyond doubt: every costlier candidate can only lose to it
        # Those that may still meet; nothing plausible: the closest goes on, measured in full.
        alive = [f for f, m in probed.items() if goal.margin(m) >= -goal.sampling_error(m, run.total)] or [max(probed, key=lambda f: goal.margin(probed[f]))]
        n *= 4
    alive.sort(key=run.rank.__getitem__)
    batch = max(evaluator.workers, 1)
    for i in range(0, len(alive), batch):
        if any(goal.meets(m) for m in run.measure(alive[i : i + batch])):
            break
    return run.outcome()


def predictor(evaluator: FormatEvaluator, candidates: list[NumberFormat], goal: Goal, curve: AccuracyPredictor, *, probe_samples: int = 10) -> Outcome:
    run = _Run("predictor", evaluator, candidates, goal)
    float_top1 = goal.float_top1_on(None)
    probes: dict[NumberFormat, Measurement] = {}

    def predicted_margin(fmt: NumberFormat) -> float:
        if fmt not in probes:  # probed when first needed
            probes[fmt] = run.probe(fmt, probe_samples)
        m = probes[fmt]
        margins = []
        if goal.min_sqnr > 0:
            margins.append(m.sqnr_db - goal.min_sqnr)
        if goal.max_drop >= 0 and float_top1 is not None:
            margins.append(goal.max_drop - curve.drop(m.r2, float_top1))
        return min(margins) if margins else math.inf

    screens: dict[NumberFormat, bool] = {}

    def screened_out(fmt: NumberFormat) -> bool:
        """Whether ``fmt`` misses the goal beyond doubt: on its 10-input probe when that already
        says so (free), else on `SCREEN_SAMPLES` samples. A step one bit narrower often misses by
        far, and a full evaluation would only confirm it."""
        if fmt not in screens:
            if misses_on_its_probe(fmt):
                screens[fmt] = True
            elif run.total <= SCREEN_SAMPLES:
                screens[fmt] = False
            else:
                screens[fmt] = misses_beyond_doubt(run.probe(fmt, SCREEN_SAMPLES))
        return screens[fmt]

    def misses_beyond_doubt(m: Measurement) -> bool:
        return goal.margin(m) < -SCREEN_SIGMAS / 2 * goal.sampling_error(m, run.total)

    def misses_on_its_probe(fmt: NumberFormat) -> bool:
        """Whether ``fmt``'s 10-input probe, if it was taken, already misses beyond doubt (free)."""
        return fmt in probes and misses_beyond_doubt(probes[fmt])

    def next_step(current: NumberFormat, wider: bool, visited: set[NumberFormat]) -> NumberFormat | None:
        near = [f for f in one_bit_neighbours(current, wider=wider) if f in run.rank and f not in visited]
        return max(near, key=predicted_margin) if near else None

    # The candidates come cheapest first, so the first predicted to meet is the cheapest that is:
    # probing stops there (every candidate is probed only when none is predicted to meet).
    guess = next((f for f in candidates if predicted_margin(f) >= 0), None)
    if guess is None:
        guess = max(candidates, key=predicted_margin)
    # The narrower steps the refinement would take from the guess, screened nearest first from
    # two bits down: the walk starts at the narrowest that may meet (narrower rounds no better,
    # so the screen stops at the first that misses beyond doubt). A curve that guesses two or
    # more bits wide then costs screens, not full evaluations of designs that are not the answer.
    start, partner = guess, None
    if run.total > SCREEN_SAMPLES:
        path = [guess]
        while (step := next_step(path[-1], False, set(path))) is not None:
            path.append(step)
            if len(path) > 2 and screened_out(step):
                path.pop()
                break
        if len(path) > 2:
            start, partner = path[-1], path[-2]
    visited = {start}
    # With workers to spare, the start and the step the refinement takes after it are measured
    # side by side: the wider neighbour when the start is screened narrower than the guess (it
    # is the answer if the start misses), else the narrower one (it is next if the start meets).
    first = [start]
    if evaluator.workers > 1 and PREDICTOR_FULL_EVALUATIONS > 1:
        if partner is None and (step := next_step(start, False, visited)) is not None and not misses_on_its_probe(step):
            partner = step
        if partner is not None:
            first.append(partner)
    met = goal.meets(run.measure(first)[0])
    # One bit at a time: narrower while it still meets (when the start met), else wider until it meets.
    narrower, current = met, start
    while (step := next_step(current, not narrower, visited)) is not None:
        if step not in run.full:
            if len(run.full) >= PREDICTOR_FULL_EVALUATIONS:
                break
            if not screened_out(step):
                run.measure([step])
        visited.add(step)
        current = step
        if (step in run.full and goal.meets(run.full[step])) != narrower:
            break  # narrower: this one misses, the one before is the answer; wider: this one meets
    return run.outcome(predicted=guess)


def run_strategy(name: str, evaluator: FormatEvaluator, candidates: list[NumberFormat], goal: Goal, *, curve: AccuracyPredictor | None = None,
                 probe_samples: int = 10) -> Outcome:
    """The strategy called ``name`` over ``candidates`` (sorted by increasing cost)."""
    if name == "exhaustive":
        return exhaustive(evaluator, candidates, goal)
    if name == "binary":
        return binary(evaluator, candidates, goal)
    if name == "halving":
        return halving(evaluator, candidates, goal)
    if name == "predictor":
        return predictor(evaluator, candidates, goal, curve or AccuracyPredictor.load(), probe_samples=probe_samples)
    raise ValueError(f"unknown strategy '{name}': choose {', '.join(STRATEGIES)}")
