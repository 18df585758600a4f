"""Passes, the context they run in, and the pass manager that runs them.

The shape follows onnx_ir's pass infrastructure (a pass returns a `PassResult`; the manager is
itself a pass) and LLVM's new pass manager (passes declare the analyses they preserve; the manager,
not the pass, invalidates caches, tags provenance and runs instruments such as timing).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import onnx_ir as ir

from qcompiler.analysis import Analysis, AnalysisManager
from qcompiler.ir import PROVENANCE_KEY, NameAuthority

if TYPE_CHECKING:
    from qcompiler.data import DataSource
    from qcompiler.targets.spec import TargetSpec


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassResult:
    """What a pass hands back: the model (possibly the same object) and whether it changed.

    ``stats`` are small facts for the report (``{"folded": 19}``).
    """

    model: ir.Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Diagnostic:
    """A note a pass leaves for the report: something kept float, a fallback taken, a warning."""

    pass_name: str
    message: str
    node: str | None = None
    level: str = "info"
    op_type: str | None = None


class Progress(Protocol):
    """What ``ctx.progress(description, total)`` yields: ``advance`` moves the bar.

    A progress object may also have ``describe(text)``, which replaces the bar's description (the
    training loop shows its running loss, learning rate and images/s there). It is optional: call
    it through ``getattr(progress, "describe", None)``, since factories written before it only
    provide ``advance``.
    """

    def advance(self, n: int = 1) -> None: ...


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


ProgressFactory = Callable[[str, int | None], Any]


@contextmanager
def null_progress(description: str, total: int | None) -> Iterator[Progress]:
    """Progress reporting that shows nothing (the default for the Python API and tests)."""
    yield _NullProgress()


@dataclass
class PassContext:
    """Everything a pass may use besides the model. Nothing in qcompiler is global."""

    target: TargetSpec
    data: DataSource | None = None
    seed: int = 0
    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    progress: ProgressFactory = null_progress
    instruments: list[Instrument] = field(default_factory=list)
    #: (pass name, seconds, modified, stats) for every pass run, in order.
    timings: list[tuple[str, float, bool, dict[str, Any]]] = field(default_factory=list)
    #: per-pass statistics, keyed by pass name (a pass run twice keeps its last stats).
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Facts later passes or the report need (e.g. the calibration settings a pipeline chose).
    facts: dict[str, Any] = field(default_factory=dict)

    def note(self, pass_name: str, message: str, *, node: str | None = None, level: str = "info", op_type: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(pass_name, message, node, level, op_type))


class Pass(abc.ABC):
    """Base class of every qcompiler pass.

    Subclasses set ``name`` (kebab-case, as written in pipelines), a frozen dataclass ``Options``
    whose typed fields are the pass options, the analyses it ``requires`` (documentation; they are
    fetched through ``ctx.analyses``) and ``preserves`` (kept valid when the pass modifies the
    model; ``"all"`` for passes that never change what analyses depend on). Numerics-preserving
    rewrites set ``tolerance`` (max abs output change) so ``--verify-each`` can hold them to it.
    The first line of the class docstring is the pass's summary in ``qc passes``.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[type[Analysis[Any]], ...]] = ()
    preserves: ClassVar[tuple[type[Analysis[Any]], ...] | str] = ()
    tolerance: ClassVar[float | None] = None

    def __init__(self, options: Any | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an Options instance or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)

    @abc.abstractmethod
    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Run on ``model`` (in place unless stated otherwise) and say whether it changed."""

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def __repr__(self) -> str:
        from qcompiler.pipeline import format_pass

        return format_pass(self)


class Instrument:
    """Hooks around every pass the manager runs (TVM's PassInstrument); override what you need."""

    def before_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext) -> None:
        pass

    def after_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext, result: PassResult) -> None:
        pass


class PassManager(Pass):
    """Runs passes in order; is itself a pass, so pipelines nest."""

    name = "pipeline"

    def __init__(self, passes: Sequence[Pass]) -> None:
        super().__init__()
        self.passes = list(passes)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        modified_any = False
        for pass_ in self.passes:
            result = self.run_one(pass_, model, ctx)
            model = result.model
            modified_any = modified_any or result.modified
        return PassResult(model, modified_any)

    @staticmethod
    def run_one(pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
        """Run one pass with instruments, provenance, naming, timing and analysis invalidation."""
        for instrument in ctx.instruments:
            instrument.before_pass(pass_, model, ctx)
        before_nodes = {id(n) for n in model.graph}
        start = time.perf_counter()
        result = pass_.run(model, ctx)
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"pass '{pass_.name}' returned {type(result).__name__}, expected PassResult")
        if result.modified:
            _tag_new_nodes(result.model, before_nodes, pass_.name)
            ctx.analyses.invalidate(pass_.preserves)
        if not isinstance(pass_, PassManager):
            # Each run keeps its own stats here (a pass may appear twice in a pipeline).
            ctx.timings.append((pass_.name, seconds, result.modified, dict(result.stats)))
            if result.stats:
                ctx.stats[pass_.name] = dict(result.stats)
        for instrument in ctx.instruments:
            instrument.after_pass(pass_, result.model, ctx, result)
        return result


def _tag_new_nodes(model: ir.Model, before: set[int], pass_name: str) -> None:
    """Give nodes (and their outputs) created by a pass a unique name and a provenance entry."""
    names: NameAuthority | None = None
    for node in model.graph:
        if id(node) in before:
            continue
        node.metadata_props.setdefault(PROVENANCE_KEY, pass_name)
        if not node.name:
            names = names or NameAuthority(model.graph)
            node.name = names.fresh(f"{pass_name}/{node.op_type}")
        for value in node.outputs:
            value.metadata_props.setdefault(PROVENANCE_KEY, pass_name)
            if not value.name:
                names = names or NameAuthority(model.graph)
                value.name = names.fresh(f"{node.name}/out{value.index()}")


def option_fields(pass_type: type[Pass]) -> list[dataclasses.Field[Any]]:
    """The typed option fields of a pass (empty for passes without options)."""
    return list(dataclasses.fields(pass_type.Options)) if dataclasses.is_dataclass(pass_type.Options) else []
