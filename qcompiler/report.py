"""The compile/verify report: dataclasses, a versioned JSON form, and a terminal table.

The JSON layout is documented in ``docs/report-schema.md`` and checked against
``qcompiler/schemas/report.schema.json``; its version is ``json_output.SCHEMA_VERSIONS["report"]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from qcompiler.json_output import dumps, stamp


@dataclass
class OutputMetrics:
    name: str
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None
    nonfinite: int = 0
    #: The same output with Q/DQ run in float (onnxruntime's basic level, no integer kernels):
    #: far above ``sqnr_db`` means the integer kernels do not compute what the graph says.
    sqnr_db_simulated: float | None = None


@dataclass
class LayerMetrics:
    tensor: str
    node: str
    op_type: str
    sqnr_db: float
    max_abs_error: float
    #: The same tensor as onnxruntime computes it with all optimizations (its integer kernels),
    #: where the tensor survives fusion as a quantized value (None elsewhere).
    sqnr_db_as_run: float | None = None


@dataclass
class SizeMetrics:
    float_bytes: int
    quantized_bytes: int
    float_weight_bytes: int
    quantized_weight_bytes: int


@dataclass
class LatencyMetrics:
    float_ms: float
    quantized_ms: float
    speedup: float
    runs: int
    batch: int
    #: The speedup the target's cost table predicts for the weight layers (None without figures).
    predicted_speedup: float | None = None


@dataclass
class VerificationReport:
    samples: int
    data: str
    outputs: list[OutputMetrics]
    accuracy_float: float | None
    accuracy_quantized: float | None
    layers: list[LayerMetrics]
    size: SizeMetrics
    latency: LatencyMetrics | None
    #: onnxruntime's optimization level the outputs were measured at ("all": as deployed).
    optimization: str = "all"


@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class KeptFloat:
    node: str
    op_type: str
    reason: str


@dataclass
class Report:
    """Everything `qc compile` or `qc verify` found, as written to ``report.json``."""

    float_model: str
    quantized_model: str
    target: str | None = None
    pipeline: str | None = None
    calibration: dict[str, Any] | None = None
    passes: list[PassTiming] = field(default_factory=list)
    kept_float: list[KeptFloat] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    verification: VerificationReport | None = None
    compile_seconds: float | None = None
    #: Files the target needs beside the model (e.g. QNN's encodings.json), as written.
    artifacts: list[str] = field(default_factory=list)
    #: The CPU the target was compiled for and what that decided (targets with a [cpu] section).
    machine: dict[str, Any] | None = None
    #: The accuracy guard's goal, what it measured and which layers it put back in float.
    guard: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as written to JSON: headed by its schema name and version, inf/nan as strings."""
        return stamp("report", asdict(self))

    def to_json(self) -> str:
        return dumps("report", asdict(self))

    def render(self, console: Console | None = None) -> None:
        """Print the report as tables."""
        render_report(self, console or Console())



def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _db(x: float) -> str:
    return f"{x:.2f} dB" if math.isfinite(x) else ("exact" if x > 0 else "-inf")


def _smaller(before: int, after: int) -> str:
    if before <= 0 or after <= 0:
        return "no weights to compare" if before <= 0 else "nothing left"
    ratio = before / after
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def render_report(report: Report, console: Console) -> None:
    head = f"[bold]{report.quantized_model}[/bold] vs float [bold]{report.float_model}[/bold]"
    if report.target:
        head += f"  target [bold]{report.target}[/bold]"
    console.print(head)
    if report.pipeline:
        console.print(f"pipeline: {report.pipeline}")
    if report.machine:
        console.print(f"compiled for: {report.machine['cpu']}", markup=False, highlight=False)
        console.print(f"weights: {report.machine['reason']}", markup=False, highlight=False)
    if report.artifacts:
        console.print(f"also written for the target: {', '.join(report.artifacts)}")
    v = report.verification
    if v is not None:
        summary = Table(title=f"Verification on {v.samples} samples from {v.data}", show_header=True)
        summary.add_column("metric")
        summary.add_column("float", justify="right")
        summary.add_column("quantized", justify="right")
        summary.add_column("ratio / delta", justify="right")
        if v.accuracy_float is not None:
            delta = 100 * (v.accuracy_quantized - v.accuracy_float)
            summary.add_row("top-1 accuracy", _pct(v.accuracy_float), _pct(v.accuracy_quantized), f"{delta:+.2f} pts")
        for o in v.outputs:
            agree = f", top-1 agree {_pct(o.top1_agreement)}" if o.top1_agreement is not None else ""
            simulated = f" (Q/DQ in float: {_db(o.sqnr_db_simulated)})" if o.sqnr_db_simulated is not None else ""
            summary.add_row(f"output '{o.name}'", "", f"SQNR {_db(o.sqnr_db)}{simulated}", f"max |err| {o.max_abs_error:.3g}{agree}")
            if o.nonfinite:
                summary.add_row(f"output '{o.name}'", "", f"[red]{o.nonfinite} non-finite values[/red]", "")
        s = v.size
        summary.add_row("file size", _bytes(s.float_bytes), _bytes(s.quantized_bytes), _smaller(s.float_bytes, s.quantized_bytes))
        summary.add_row("weight bytes", _bytes(s.float_weight_bytes), _bytes(s.quantized_weight_bytes), _smaller(s.float_weight_bytes, s.quantized_weight_bytes))
        if v.latency is not None:
            lat = v.latency
            measured = f"{lat.speedup:.2f}x faster" if lat.speedup >= 1 else f"{1 / lat.speedup:.2f}x slower"
            if lat.predicted_speedup is not None:
                measured += f" (cost table: {lat.predicted_speedup:.2f}x)"
            summary.add_row(f"latency (median of {lat.runs}, batch {lat.batch})", f"{lat.float_ms:.3f} ms", f"{lat.quantized_ms:.3f} ms", measured)
        console.print(summary)
        if v.layers:
            worst = sorted(v.layers, key=lambda l: l.sqnr_db)
            layers = Table(title=f"Per-layer SQNR ({len(v.layers)} tensors, worst first, 10 shown)")
            for col in ("tensor", "node", "op", "SQNR", "as run", "max |err|"):
                layers.add_column(col, justify="right" if col in ("SQNR", "as run", "max |err|") else "left")
            for l in worst[:10]:
                layers.add_row(l.tensor, l.node, l.op_type, _db(l.sqnr_db), _db(l.sqnr_db_as_run) if l.sqnr_db_as_run is not None else "-", f"{l.max_abs_error:.3g}")
            console.print(layers)
    if report.kept_float:
        kept = Table(title=f"Kept in float ({len(report.kept_float)} nodes)")
        for col in ("node", "op", "reason"):
            kept.add_column(col)
        for k in report.kept_float[:20]:
            kept.add_row(k.node, k.op_type, k.reason)
        if len(report.kept_float) > 20:
            kept.add_row("...", "", f"{len(report.kept_float) - 20} more in report.json")
        console.print(kept)
    _render_guard(report, console)
    _render_precision(report, console)
    for d in report.diagnostics:
        if d.get("level") == "warning":
            where = f" ({d['node']})" if d.get("node") else ""
            console.print(f"[yellow]warning[/yellow]{where}: {d['message']}")
    if report.passes:
        passes = Table(title="Passes" + (f" (compile {report.compile_seconds:.2f} s)" if report.compile_seconds else ""))
        for col in ("pass", "seconds", "changed", "stats"):
            passes.add_column(col, justify="right" if col == "seconds" else "left")
        for p in report.passes:
            # Nested stats (per-layer tables, the Pareto front) are in report.json and their own tables.
            shown = ", ".join(f"{k}={v}" for k, v in p.stats.items() if not isinstance(v, (dict, list)))
            passes.add_row(p.name, f"{p.seconds:.3f}", "yes" if p.modified else "no", shown)
        console.print(passes)


def _render_precision(report: Report, console: Console) -> None:
    """Per-layer widths and sensitivities chosen by assign-precision, with the Hessian traces."""
    stats = next((p.stats for p in reversed(report.passes) if p.name == "assign-precision"), None)
    if not stats or "layers" not in stats:
        return
    traces = next((p.stats.get("traces", {}) for p in report.passes if p.name == "hessian-trace"), {})
    budget = stats.get("budget", {})
    spent = f"{budget['kind']}={budget['value']}: {budget['used']:.4g} of {budget['limit']:.4g} {budget['unit']}" if budget else ""
    table = Table(title=f"Weight bit-widths ({stats['method']}, {stats['average_bits']} bits on average; {spent})")
    for col in ("node", "bits", "Tr(H) [95% CI]", "sensitivity", "SQNR"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for weight, layer in stats["layers"].items():
        ci = traces.get(weight, {}).get("ci95")
        trace = f"{layer['trace']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
        measured = layer.get("sqnr_db")  # the verifier's, attached after compiling (compiler.py)
        table.add_row(layer["node"], str(layer["bits"]), trace, f"{layer['sensitivity']:.3g}", _db(measured) if measured is not None else "-")
    console.print(table)
    candidates = [c for c in stats.get("selection", []) if c.get("measured_loss_increase") is not None]
    if candidates:
        loss = candidates[0]["loss"]
        shown = "; ".join(f"{c['estimate']} estimate, no layer below {c['floor']} bits: {c['measured_loss_increase']:.4g}" + (" (chosen)" if c["selected"] else "")
                          for c in candidates)
        console.print(f"ILP candidates, measured with every weight quantized ({loss} from the float outputs): {shown}")


def _render_guard(report: Report, console: Console) -> None:
    """The accuracy guard's verdict, and each fallback with its measured effect."""
    g = report.guard
    if not g:
        return
    drop = lambda d: f", top-1 drop {d:.2f} pts" if d is not None else ""  # noqa: E731
    status = "[green]met[/green]" if g["met"] else "[red]MISSED[/red]"
    console.print(f"accuracy guard ({g['goal']}, as onnxruntime runs it, on {g['samples']} held-out samples from {g['data']}): {status}: "
                  f"SQNR {_db(g['sqnr_db'])}{drop(g['drop_points'])} (as compiled: {_db(g['initial_sqnr_db'])}{drop(g['initial_drop_points'])})")
    if g["fallbacks"]:
        table = Table(title=f"Accuracy guard: {len(g['fallbacks'])} layer(s) put back in float, most damaging first")
        for col in ("node", "op", "SQNR before", "SQNR after", "top-1 drop after"):
            table.add_column(col, justify="left" if col in ("node", "op") else "right")
        for f in g["fallbacks"]:
            table.add_row(f["node"], f["op_type"], _db(f["sqnr_before_db"]), _db(f["sqnr_after_db"]), "-" if f["drop_after_points"] is None else f"{f['drop_after_points']:.2f} pts")
        console.print(table)
    if g.get("note"):
        console.print(f"[yellow]accuracy guard[/yellow]: {g['note']}")
