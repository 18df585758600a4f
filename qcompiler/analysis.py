"""Analyses: facts about a model computed lazily, cached, and dropped when a rewrite invalidates them.

An analysis is a frozen dataclass (its fields are its parameters, so two requests with the same
parameters share one cached result) with a ``compute(model, ctx)`` method. Passes ask
``ctx.analyses.get(SomeAnalysis(...), model)``; the pass manager calls ``invalidate`` after each
pass with the analyses that pass declared it preserves, the way LLVM's ``PreservedAnalyses`` work.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import onnx_ir as ir

if TYPE_CHECKING:
    from qcompiler.pass_manager import PassContext

T = TypeVar("T")


class Analysis(abc.ABC, Generic[T]):
    """Base of all analyses. Subclasses are frozen dataclasses whose fields are parameters."""

    #: Kebab-case name shown in timings and reports.
    name: ClassVar[str] = "analysis"

    @abc.abstractmethod
    def compute(self, model: ir.Model, ctx: PassContext) -> T:
        """Compute the result on ``model``. Must not modify the model."""


@dataclass
class AnalysisStats:
    """Counters that make caching observable (tests and ``--time-passes`` read them)."""

    computed: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class AnalysisManager:
    """Caches analysis results for one model and forgets those a rewrite did not preserve."""

    def __init__(self) -> None:
        self._cache: dict[Analysis[Any], Any] = {}
        self._model_id: int | None = None
        self.stats = AnalysisStats()

    def get(self, analysis: Analysis[T], model: ir.Model, ctx: PassContext) -> T:
        """The result of ``analysis`` on ``model``: cached if still valid, else computed now."""
        if self._model_id != id(model):
            # A different model object (e.g. a functional pass returned a copy): nothing carries over.
            self._cache.clear()
            self._model_id = id(model)
        if analysis in self._cache:
            self.stats.hits[analysis.name] = self.stats.hits.get(analysis.name, 0) + 1
            return self._cache[analysis]
        start = time.perf_counter()
        result = analysis.compute(model, ctx)
        self.stats.seconds[analysis.name] = self.stats.seconds.get(analysis.name, 0.0) + time.perf_counter() - start
        self.stats.computed[analysis.name] = self.stats.computed.get(analysis.name, 0) + 1
        self._cache[analysis] = result
        return result

    def cached(self, analysis_type: type[Analysis[Any]]) -> list[Analysis[Any]]:
        """The cached analyses of one type (their parameters), newest last."""
        return [a for a in self._cache if isinstance(a, analysis_type)]

    def invalidate(self, preserved: tuple[type[Analysis[Any]], ...] | str = ()) -> None:
        """Drop every cached result whose type is not in ``preserved`` (``"all"`` keeps everything)."""
        if preserved == "all":
            return
        self._cache = {a: r for a, r in self._cache.items() if isinstance(a, tuple(preserved))}  # type: ignore[arg-type]

    def clear(self) -> None:
        self._cache.clear()
