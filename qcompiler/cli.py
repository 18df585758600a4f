"""The ``qc`` command line: compile, verify, validate, cost, pack, passes, targets.

User mistakes surface as one line on stderr naming the file, node, pass or option at fault, with
exit status 2; a traceback means a bug in qcompiler.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qcompiler.errors import QCError

if TYPE_CHECKING:
    from qcompiler.targets.spec import TargetSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="qcompiler: quantize ONNX models for a target backend and verify them with onnxruntime.")
targets_app = typer.Typer(help="List the built-in targets, show one, or measure a cost table on this machine (qc target measure).", invoke_without_command=True)
app.add_typer(targets_app, name="targets")
# `qc target measure ...` reads naturally too; one group, two names.
app.add_typer(targets_app, name="target", hidden=True)

out = Console()
err = Console(stderr=True)

PluginOpt = Annotated[Optional[list[Path]], typer.Option("--plugin", help="Python file that registers passes (repeatable).")]
CpuOpt = Annotated[Optional[str], typer.Option("--cpu", help="Compile for this ISA instead of this machine's: avx512-vnni, avx-vnni, avx512, avx2, sse4, arm64-dot, arm64.")]


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[object]:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)

        class _Bar:
            def advance(self, n: int = 1) -> None:
                progress.advance(task, n)

            def describe(self, text: str) -> None:
                # Escaped: the description column renders rich markup, and a label may hold '['.
                progress.update(task, description=escape(text))

        yield _Bar()


def _load_plugins(plugins: list[Path] | None) -> None:
    from qcompiler.registry import load_plugin_file

    for path in plugins or []:
        load_plugin_file(path)


@app.command("compile")
def compile_cmd(
    model: Annotated[Path, typer.Argument(help="Float ONNX model.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Built-in target name or a .toml file.")] = "ort-cpu",
    calib: Annotated[Optional[Path], typer.Option("--calib", help=".npz calibration data (arrays named after inputs).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for model.onnx and report.json.")] = Path("out"),
    data: Annotated[Optional[Path], typer.Option("--data", help=".npz to verify on (default: the calibration data).")] = None,
    calib_count: Annotated[Optional[int], typer.Option("--calib-count", help="Use only the first N calibration samples.")] = None,
    pipeline: Annotated[Optional[str], typer.Option("--pipeline", help="Pass pipeline, e.g. 'fold-batchnorm,calibrate{method=mse},insert-qdq'.")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Mixed-precision weights under a budget: size=0.6 (of the int8 bytes), bits=4.5 (average), bops=0.4 or latency=0.8 (of the int8 model's); runs the target's mixed_pipeline.")] = None,
    print_after: Annotated[Optional[list[str]], typer.Option("--print-after", help="Print the model after this pass ('all' for every pass).")] = None,
    time_passes: Annotated[bool, typer.Option("--time-passes", help="Print the time each pass and analysis took.")] = False,
    verify_each: Annotated[bool, typer.Option("--verify-each", help="ONNX checker + onnxruntime run (+ declared tolerance) after every pass.")] = False,
    dump_dir: Annotated[Optional[Path], typer.Option("--dump-dir", help="Save the model after every pass into this folder.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the onnxruntime comparison.")] = False,
    latency_runs: Annotated[int, typer.Option("--latency-runs", min=0, help="Timed runs per model for the latency figure (0 to skip).")] = 50,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    plot: Annotated[bool, typer.Option("--plot", help="Also write OUTPUT/pareto.png: assign-precision's budget vs sensitivity front.")] = False,
    cpu: CpuOpt = None,
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", help="Accuracy guard: every output's SQNR (dB) against the float model, as onnxruntime runs it on held-out data; layers fall back to float until met (default 20; 0 turns the bound off). Given explicitly, it also overrides the widths of a --budget.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Accuracy guard: largest top-1 drop in points on labelled held-out data.")] = None,
    plugin: PluginOpt = None,
) -> None:
    """Quantize MODEL for a target, write OUTPUT/model.onnx and OUTPUT/report.json, print the report.

    Exits 1 (with the best model found written) when the accuracy guard's goal is missed."""
    from qcompiler.compiler import DEFAULT_MIN_SQNR_DB, compile as run_compile
    from qcompiler.instruments import DumpDir, PrintAfter, VerifyEach

    _load_plugins(plugin)
    if budget is not None:
        pipeline = _budget_pipeline(target, cpu, pipeline, budget)
    if plot:
        _check_plot(pipeline)
    if calib is None:
        from qcompiler.targets.spec import load_target

        spec = load_target(target, cpu=cpu)
        steps = pipeline if pipeline is not None else spec.pipeline
        # Weight-only targets quantize without data; anything that calibrates needs it.
        if "calibrate" in steps or ("insert-qdq" in steps and spec.activations.quantize):
            raise QCError("calibration data is required: pass --calib FILE.npz", option="--calib")
    for name, value in (("--min-sqnr", min_sqnr), ("--max-drop", max_drop)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise QCError(f"expected a finite number >= 0, got {value}", option=name)
    if max_drop is not None and no_verify:
        raise QCError("the accuracy guard measures the compiled model: it cannot run with --no-verify", option="--max-drop")
    instruments = []
    if print_after:
        from qcompiler.registry import all_passes

        known = all_passes()
        for name in print_after:
            if name != "all" and name not in known:
                raise QCError(f"unknown pass (known passes: {', '.join(known)})", option="--print-after", pass_name=name)
        instruments.append(PrintAfter(print_after, out))
    if verify_each:
        instruments.append(VerifyEach())
    if dump_dir is not None:
        here, out_folder = dump_dir.resolve(), output.resolve()
        if here == out_folder or out_folder in here.parents:
            # The output folder is written under a temporary name and moved in place at the end,
            # which would delete every dump saved inside it.
            raise QCError("is inside the output folder, which is replaced when the compile finishes: choose a folder beside it", file=str(dump_dir), option="--dump-dir")
        instruments.append(DumpDir(dump_dir, inputs=(model, calib, data, target if target.endswith(".toml") else None)))
    result = run_compile(
        model,
        target=target,
        calibration=calib,
        pipeline=pipeline,
        calib_count=calib_count,
        verify_data=data,
        verify=not no_verify,
        output_dir=output,
        force=force,
        seed=seed,
        instruments=instruments,
        progress=_progress,
        latency_runs=latency_runs,
        cpu=cpu,
        min_sqnr=(None if min_sqnr == 0 else min_sqnr) if min_sqnr is not None else DEFAULT_MIN_SQNR_DB,
        max_drop=max_drop,
        # An explicit goal may override the widths a budget chose; the default only measures them.
        guard_fallback=True if (min_sqnr or max_drop is not None) else None,
    )
    result.report.render(out)
    if time_passes:
        _print_timings(result)
    out.print(f"wrote {output / 'model.onnx'} and {output / 'report.json'}")
    if plot:
        from qcompiler.plot import plot_pareto

        stats = next(p.stats for p in reversed(result.report.passes) if p.name == "assign-precision")
        out.print(f"wrote {plot_pareto(stats, output / 'pareto.png', title=f'{model.name}: precision assignment')}")
    if result.report.guard is not None and not result.report.guard["met"] and result.report.guard["fell_back"]:
        err.print(f"error: accuracy guard: {result.report.guard['note']} (goal: {result.report.guard['goal']}); the best model found is in {output}", markup=False, highlight=False)
        raise typer.Exit(1)


@app.command("search")
def search_cmd(
    model: Annotated[Path, typer.Argument(help="Float ONNX model.")],
    calib: Annotated[Path, typer.Option("--calib", help=".npz data the candidates run on (its last --samples samples; labels for --max-drop).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for model.onnx (the chosen formats) and report.json.")] = Path("out"),
    formats: Annotated[Optional[str], typer.Option("--formats", help="Candidate weight formats, '|'-separated, ranges allowed: int<2..8>|e4m3fn|mxfp4|float<3,4>|... (default: int2 to int8, e4m3fn, e5m2, the MX formats, nvfp4 and fp16).")] = None,
    activations: Annotated[str, typer.Option("--activations", help="Format of every layer input: fp32, fp16, uint8, int8, e4m3fn, e5m2.")] = "uint8",
    granularity: Annotated[str, typer.Option("--granularity", help="layer (a format per layer) or network (one for all).")] = "layer",
    strategy: Annotated[str, typer.Option("--strategy", help="How the one format for the network is found: exhaustive, binary, halving or predictor (Hill et al.'s R^2 predictor).")] = "exhaustive",
    objective: Annotated[str, typer.Option("--objective", help="What is minimised: energy (MACs and weight reads) or time (iso-area MAC time).")] = "energy",
    predictor: Annotated[Optional[Path], typer.Option("--predictor", help="--strategy predictor: a fitted curve (.json from bench/formats.py; default: the built-in one).")] = None,
    probe_samples: Annotated[int, typer.Option("--probe-samples", min=1, help="--strategy predictor: inputs each candidate is probed on (Hill et al.: 10).")] = 10,
    min_sqnr: Annotated[float, typer.Option("--min-sqnr", help="Goal: output SQNR against float, dB (0: none).")] = 25.0,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Goal: top-1 drop in points (needs labels).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration samples every candidate runs on (the last ones).")] = 512,
    layer_samples: Annotated[int, typer.Option("--layer-samples", min=0, help="--granularity layer: each layer's damage in each format is measured on the first N of those samples (0: all); answers are checked on all.")] = 256,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Worker processes (0: one per CPU).")] = 0,
    executor: Annotated[str, typer.Option("--executor", help="process (local worker processes) or ray (Ray actors: a local Ray, or --ray-address).")] = "process",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="A running Ray cluster's address for --executor ray.")] = None,
    target: Annotated[str, typer.Option("--target", "-t", help="Target whose CPU and energy table apply.")] = "ort-cpu",
    energy: Annotated[Optional[str], typer.Option("--energy", help="Energy table: built-in name or .toml (default: the target's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
) -> None:
    """Search number formats for MODEL's weights (search-formats): least modelled energy that meets the goal, each candidate run in onnxruntime. Exits 1, with the most accurate candidate written, when no candidate meets the goal."""
    from qcompiler.compiler import compile as run_compile

    options = [f"formats={formats}"] if formats else []
    options += [f"activations={activations}", f"granularity={granularity}", f"strategy={strategy}", f"objective={objective}",
               f"min-sqnr={min_sqnr:g}", f"samples={samples}", f"layer-samples={layer_samples}", f"workers={workers}", f"executor={executor}", f"probe-samples={probe_samples}"]
    if predictor is not None:
        options.append(f"predictor={predictor}")
    if ray_address:
        options.append(f"ray-address={ray_address}")
    if max_drop is not None:
        options.append(f"max-drop={max_drop:g}")
    if energy:
        options.append(f"energy={energy}")
    pipeline = "infer-shapes,fold-constants,fold-batchnorm,search-formats{" + ",".join(options) + "}"
    # The search measured its own candidates; the compile's guard would hold them to its default goal.
    result = run_compile(model, target=target, calibration=calib, pipeline=pipeline, verify=False, output_dir=output, force=force, min_sqnr=None, progress=_progress, latency_runs=0)
    stats = next(p.stats for p in result.report.passes if p.name == "search-formats")
    grid = Table(title=f"{model}: candidates measured in full ({stats['strategy']}: {stats['full_evaluations']} of {stats['candidates']}), each run in onnxruntime on {stats['samples']} samples")
    for col in ("weights", "energy µJ", "SQNR dB", "top-1 %", "goal"):
        grid.add_column(col, justify="left" if col == "weights" else "right")
    for u in stats["uniform"]:
        grid.add_row(f"{u['format']} everywhere", f"{u['energy_pj'] / 1e6:.2f}", f"{u['sqnr_db']:.2f}", f"{u['top1']:.2f}" if u["top1"] is not None else "-", "met" if u["meets_goal"] else "missed")
    from collections import Counter

    chosen = ", ".join(f"{fmt} x{n}" for fmt, n in Counter(stats["layers"].values()).most_common())
    grid.add_row(f"chosen ({stats['granularity']}): {chosen}", f"{stats['energy_pj'] / 1e6:.2f}", f"{stats['sqnr_db']:.2f}", f"{stats['top1']:.2f}" if stats["top1"] is not None else "-", "met" if stats["goal_met"] else "missed")
    out.print(grid)
    versus = f", {stats['energy_vs_best_uniform']:.2f}x less than the best uniform format ({stats['best_uniform']})" if stats["best_uniform"] else ""
    if stats["objective"] == "time":
        versus += f"; modelled iso-area MAC time {stats['cost_vs_fp32']:.2f}x less than fp32 (the objective)"
    if stats["predicted"]:
        versus += f"; the predictor's guess was {stats['predicted']}"
    out.print(f"modelled energy {stats['energy_vs_fp32']:.2f}x less than fp32{versus}; {stats['evaluations']} full evaluations and {stats['probes']} probes on {stats['workers']} {stats['executor']} worker(s), "
              f"{stats['seconds']:.1f} s ({stats['energy_table']}; `qc cost {output / 'model.onnx'}` lists its assumptions)", markup=False, highlight=False)
    out.print(f"wrote {output / 'model.onnx'} and {output / 'report.json'}", markup=False, highlight=False)
    if not stats["goal_met"]:
        how_close = f"SQNR {stats['sqnr_db']:.2f} dB against a goal of {min_sqnr:g} dB" if min_sqnr > 0 else ""
        if max_drop is not None and stats["top1"] is not None:
            how_close += ("; " if how_close else "") + f"top-1 drop {stats['float_top1'] - stats['top1']:.2f} against a goal of {max_drop:g}"
        err.print(f"error: no candidate met the goal; the most accurate one is in {output} ({how_close})", markup=False, highlight=False)
        raise typer.Exit(1)


def _budget_pipeline(target: str, cpu: str | None, pipeline: str | None, budget: str) -> str:
    """The pipeline ``--budget`` runs: the target's mixed_pipeline with the budget filled in."""
    from qcompiler.passes.assign_precision import budget_pipeline
    from qcompiler.targets.spec import load_target

    if pipeline is not None:
        raise QCError("cannot be combined with --pipeline: put assign-precision{budget=...} in the pipeline instead", option="--budget")
    return budget_pipeline(load_target(target, cpu=cpu), budget, option="--budget")


def _check_plot(pipeline: str | None) -> None:
    """--plot needs matplotlib and an assign-precision pass that records its front: say so first."""
    from qcompiler.pipeline import parse_pipeline
    from qcompiler.plot import require_matplotlib

    require_matplotlib()
    passes = parse_pipeline(pipeline).passes if pipeline else []
    if not any(p.name == "assign-precision" and p.options.pareto_points > 0 for p in passes):
        raise QCError("the pipeline has no assign-precision pass with pareto-points > 0 to plot", option="--plot")


def _print_timings(result) -> None:
    table = Table(title="Pass timings")
    table.add_column("pass")
    table.add_column("seconds", justify="right")
    total = 0.0
    for p in result.report.passes:
        table.add_row(p.name, f"{p.seconds:.3f}")
        total += p.seconds
    table.add_row("[bold]total[/bold]", f"[bold]{total:.3f}[/bold]")
    out.print(table)


@app.command("verify")
def verify_cmd(
    float_model: Annotated[Path, typer.Argument(help="The float ONNX model.")],
    quant_model: Annotated[Path, typer.Argument(help="A quantized version of it (from any tool).")],
    data: Annotated[Path, typer.Option("--data", help=".npz with arrays named after the inputs; optional 'labels'.")],
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    count: Annotated[Optional[int], typer.Option("--count", help="Use only the first N samples.")] = None,
    latency_runs: Annotated[int, typer.Option("--latency-runs", min=0, help="Timed runs per model (0 to skip).")] = 50,
) -> None:
    """Compare FLOAT_MODEL and QUANT_MODEL in onnxruntime and print the report."""
    from qcompiler.compiler import verify as run_verify
    from qcompiler.ir import write_file_atomically

    if json_path is not None and not json_path.parent.is_dir():
        raise QCError("its folder does not exist", file=str(json_path), option="--json")
    _not_an_input(json_path, "--json", float_model, quant_model, data)
    report = run_verify(float_model, quant_model, data, count=count, progress=_progress, latency_runs=latency_runs)
    report.render(out)
    if json_path is not None:
        if not json_path.parent.is_dir():
            raise QCError("its folder does not exist", file=str(json_path), option="--json")
        write_file_atomically(json_path, report.to_json().encode())


@app.command("validate")
def validate_cmd(
    model: Annotated[Path, typer.Argument(help="A quantized ONNX model (from qcompiler or any other tool).")],
    target: Annotated[str, typer.Option("--target", "-t", help="Built-in target name or a .toml file.")] = "ort-cpu",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the violations as JSON here.")] = None,
    cpu: CpuOpt = None,
) -> None:
    """Check MODEL against a target's rules (for this CPU, or --cpu); list every violation. Exit 0 when clean, 1 with violations, 2 on bad input."""

    from qcompiler.ir import load_model
    from qcompiler.json_output import write_json
    from qcompiler.targets.spec import load_target
    from qcompiler.validate import RULES, validate

    spec = load_target(target, cpu=cpu)
    if json_path is not None and not json_path.parent.is_dir():
        raise QCError("its folder does not exist", file=str(json_path), option="--json")
    _not_an_input(json_path, "--json", model, target if target.endswith(".toml") else None)
    violations = validate(load_model(model), spec)
    summary = f"{model}: {len(violations)} violation(s) of target '{spec.name}'" if violations else f"{model}: clean against target '{spec.name}' ({len(RULES)} rules checked)"
    if not _stdout_is_terminal():
        # Piped or redirected: one violation per line, names whole, fields tab-separated, so
        # `qc validate ... | grep NODE` (or cut/awk) finds them; the count goes to stderr.
        for v in violations:
            typer.echo("\t".join(_plain_field(f) for f in (v.rule, v.node, v.op_type, v.message, v.fix)))
        if violations:
            err.print(summary, markup=False, highlight=False, soft_wrap=True)
        else:
            typer.echo(summary)
    elif violations:
        from rich.text import Text

        # Text cells: node names such as 'block[conv]' are not rich markup.
        table = Table(title=Text(summary))
        for col in ("node", "op", "rule", "problem", "fix"):
            table.add_column(col, overflow="fold")
        for v in violations:
            table.add_row(*(Text(f) for f in (v.node, v.op_type, v.rule, v.message, v.fix)))
        out.print(table)
    else:
        out.print(summary, markup=False, highlight=False)
    if json_path is not None:
        write_json(json_path, "validate", {"model": str(model), "target": spec.name, "clean": not violations, "rules": RULES,
                                           "violations": [v.to_dict() for v in violations]})
    if violations:
        raise typer.Exit(1)


@app.command("cost")
def cost_cmd(
    model: Annotated[Path, typer.Argument(help="An ONNX model, float or quantized (each tensor's format read from its qc.format, else its storage type).")],
    target: Annotated[str, typer.Option("--target", "-t", help="Built-in target name or a .toml file: its [energy] table is used.")] = "ort-cpu",
    energy: Annotated[Optional[str], typer.Option("--energy", help="Another energy table: a built-in name or a .toml file (layout: targets/energy/horowitz-45nm.toml).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the per-layer costs and totals as JSON here.")] = None,
) -> None:
    """Modelled energy per inference of MODEL's weight layers: MACs, formats, compute and memory energy, against the same network in fp32, with every figure's source."""
    import dataclasses

    from qcompiler.energy_model import layer_energies, load_energy_table, totals
    from qcompiler.ir import load_model
    from qcompiler.json_output import write_json
    from qcompiler.pass_manager import PassContext
    from qcompiler.pipeline import parse_pipeline
    from qcompiler.targets.spec import load_target

    spec = load_target(target)
    if json_path is not None:
        if not json_path.parent.is_dir():
            raise QCError("its folder does not exist", file=str(json_path), option="--json")
        _not_an_input(json_path, "--json", model, energy if energy and energy.endswith(".toml") else None, target if target.endswith(".toml") else None)
    table = load_energy_table(energy or spec.energy_table)
    loaded = load_model(model)
    # Static shapes for the MAC counts: inference here, on a copy (the file is not touched).
    loaded = parse_pipeline("infer-shapes").run(loaded, PassContext(target=spec)).model
    rows = layer_energies(loaded, table)
    if not rows:
        raise QCError("no layer with weights (Conv, ConvTranspose, Gemm, MatMul with a constant operand) to cost", file=str(model))
    total = totals(rows)
    grid = Table(title=f"{model}: modelled energy per inference ({table.name})")
    for col in ("layer", "op", "MACs", "weights", "input", "weight KiB", "compute µJ", "memory µJ", "iso-area x"):
        grid.add_column(col, justify="left" if col in ("layer", "op", "weights", "input") else "right", overflow="fold")
    for r in rows:
        grid.add_row(escape(r.node), r.op_type, f"{r.macs:,}", r.weight_format, r.activation_format, f"{r.weight_bits / 8 / 1024:,.1f}",
                     f"{r.compute_pj / 1e6:.3f}", f"{r.memory_pj / 1e6:.3f}", f"{r.iso_area_speedup:.2f}")
    out.print(grid)
    out.print(f"total: {total.macs:,} MACs; compute {total.compute_pj / 1e6:.3f} µJ, memory {total.memory_pj / 1e6:.3f} µJ, "
              f"together {total.total_pj / 1e6:.3f} µJ per inference", markup=False, highlight=False)
    out.print(f"against the same layers in fp32 ({total.fp32_total_pj / 1e6:.3f} µJ): compute {total.fp32_compute_pj / total.compute_pj:.2f}x, "
              f"memory {total.fp32_memory_pj / total.memory_pj:.2f}x, together {total.fp32_total_pj / total.total_pj:.2f}x less energy; "
              f"iso-area speedup {total.iso_area_speedup:.2f}x (modelled, not measured)", markup=False, highlight=False)
    out.print("assumptions:", markup=False)
    for line in table.assumptions():
        out.print(f"  {line}", markup=False, highlight=False)
    if json_path is not None:
        write_json(json_path, "cost", {"model": str(model), "target": spec.name, "energy_table": table.name, "assumptions": table.assumptions(),
                                       "layers": [dataclasses.asdict(r) for r in rows],
                                       "totals": {**dataclasses.asdict(total), "total_pj": total.total_pj, "fp32_total_pj": total.fp32_total_pj}})


def _stdout_is_terminal() -> bool:
    """Whether `qc validate` writes to a terminal (a table) or to a pipe or file (plain lines)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def _plain_field(text: str) -> str:
    """One field of a plain `qc validate` line: tabs and newlines would split the record."""
    return " ".join(text.replace("\t", " ").splitlines())


def _not_an_input(path: Path | None, option: str, *inputs: Path | str | None) -> None:
    """Refuse an output path that is (symlinks resolved) one of the command's input files:
    writing there would destroy the input."""
    if path is None:
        return
    target = Path(path).resolve()
    for given in inputs:
        if given is not None and Path(given).exists() and Path(given).resolve() == target:
            raise QCError(f"is an input of this command ({given}): writing there would replace it; choose another path", file=str(path), option=option)


def _writable_file(path: Path, force: bool, option: str) -> None:
    """Refuse to overwrite an existing file without --force, or to write into a missing folder."""
    if path.is_dir():
        raise QCError("is a folder, expected a file path", file=str(path), option=option)
    if path.exists() and not force:
        raise QCError("already exists (pass --force to replace it)", file=str(path), option=option)
    if not path.parent.is_dir():
        raise QCError("its folder does not exist", file=str(path), option=option)


@app.command("pack")
def pack_cmd(
    model: Annotated[Path, typer.Argument(help="A compiled ONNX model with clustered weights (cluster-weights).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .qcz file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Write MODEL's clustered weights Huffman-coded into a .qcz file, and print its size."""
    from qcompiler.codebook.qcz import pack
    from qcompiler.ir import load_model

    load_model(model)  # a missing or broken model gets the usual one-line error
    _not_an_input(output, "--output", model)
    _writable_file(output, force, "--output")
    size = pack(model, output)
    on_disk = output.stat().st_size
    float_bytes = 4 * size.weights
    out.print(f"wrote {output}: {on_disk:,} bytes; {size.weights:,} clustered weights in {size.total_bits / 8:,.0f} coded bytes "
              f"(indices {size.index_bits / 8:,.0f}, gaps {size.gap_bits / 8:,.0f}, codebooks {size.codebook_bits / 8:,.0f}, tables {size.table_bits / 8:,.0f}): "
              f"{size.ratio:.2f}x against float32 weights; the whole file is {float_bytes / on_disk:.2f}x smaller than those weights")


@app.command("unpack")
def unpack_cmd(
    qcz: Annotated[Path, typer.Argument(help="A .qcz file written by qc pack.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The ONNX model to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Restore the ONNX model a .qcz file holds (same outputs as the packed model, bit for bit)."""
    from qcompiler.codebook.qcz import unpack
    from qcompiler.ir import write_file_atomically

    _not_an_input(output, "--output", qcz)
    _writable_file(output, force, "--output")
    write_file_atomically(output, unpack(qcz).SerializeToString())
    out.print(f"wrote {output}")


@app.command("passes")
def passes_cmd(plugin: PluginOpt = None) -> None:
    """List every registered pass with its summary and options."""
    from qcompiler.pass_manager import option_fields
    from qcompiler.pipeline import describe_type, option_key, option_types
    from qcompiler.registry import all_passes

    _load_plugins(plugin)
    table = Table(title="Registered passes")
    for col in ("pass", "summary", "options"):
        table.add_column(col)
    for name, cls in all_passes().items():
        types = option_types(cls)
        opts = [f"{option_key(f.name)}: {describe_type(types[f.name])} = {str(f.default).lower() if isinstance(f.default, bool) else f.default}" for f in option_fields(cls)]
        table.add_row(name, cls.summary(), "\n".join(opts) or "-")
    out.print(table)


@targets_app.callback()
def targets_list(ctx: typer.Context) -> None:
    """List the built-in targets."""
    if ctx.invoked_subcommand is not None:
        return
    from qcompiler.targets.spec import list_targets, load_target

    table = Table(title="Targets")
    for col in ("target", "description", "default pipeline"):
        table.add_column(col)
    for name in list_targets():
        spec = load_target(name)
        table.add_row(name, spec.description, spec.pipeline)
    out.print(table)


@targets_app.command("show")
def targets_show(target: Annotated[str, typer.Argument(help="Built-in target name or a .toml file.")], cpu: CpuOpt = None) -> None:
    """Print one target's effective description (after 'extends') as TOML, resolved for this CPU (or --cpu)."""
    from qcompiler.targets.spec import load_target, target_to_toml

    spec = load_target(target, cpu=cpu)
    # soft_wrap: the TOML must stay valid when piped to a file, whatever the terminal's width.
    out.print(f"# {spec.path}", markup=False, highlight=False, soft_wrap=True)
    out.print(target_to_toml(spec), markup=False, highlight=False, soft_wrap=True)


@targets_app.command("measure")
def targets_measure(
    target: Annotated[str, typer.Argument(help="Built-in target name or a .toml file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Target file to write: extends TARGET, with the measured [cost].")],
    model: Annotated[Optional[Path], typer.Option("--model", help="Measure this model's own Conv/Gemm/MatMul layers instead of representative ones.")] = None,
    runs: Annotated[int, typer.Option("--runs", min=10, help="Timed runs per layer and dtype.")] = 300,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also time each weight layer quantized and in float between quantizers (what insert-qdq's speed check decides on), print it and write OUTPUT.layers.json.")] = False,
) -> None:
    """Measure per-op latency by weight dtype in onnxruntime on this machine; write a target file with it."""
    from qcompiler.ir import load_model, write_file_atomically
    from qcompiler.latency_table import iter_rows, measure, model_layers
    from qcompiler.targets.spec import load_target

    spec = load_target(target)
    _not_an_input(output, "--output", model, target if target.endswith(".toml") else None)
    if per_layer:
        _not_an_input(output.with_suffix(".layers.json"), "--per-layer", model, target if target.endswith(".toml") else None)
    _writable_file(output, force, "--output")
    if per_layer:
        from qcompiler.layer_speed import skip_reason

        if (why := skip_reason(spec)) is not None:
            raise QCError(f"cannot time layers for this target: {why}", option="--per-layer")
        _writable_file(output.with_suffix(".layers.json"), force, "--per-layer")
    layers = model_layers(load_model(model)) if model is not None else None
    table = measure(spec, layers, runs=runs, progress=_progress)
    rows = Table(title=f"Latency by weight dtype, target '{spec.name}' ({table.source})")
    for col in ("op", "dtype", "float ms", "dtype ms", "cost per MAC (float32 = 1)"):
        rows.add_column(col, justify="right" if col != "op" else "left")
    for op_type, dtype, f_ms, q_ms, cost in iter_rows(table):
        rows.add_row(op_type, dtype, f"{f_ms:.3f}", f"{q_ms:.3f}", f"{cost:.3f}")
    out.print(rows)
    if per_layer:
        _print_layer_speed(spec, layers, output.with_suffix(".layers.json"))
    extends = target if not Path(target).exists() else str(Path(target).resolve())
    write_file_atomically(output, table.to_toml(extends).encode())
    out.print(f"wrote {output}: pass it back with --target {output}")


def _print_layer_speed(spec: TargetSpec, layers: list | None, path: Path) -> None:
    """Time each layer as insert-qdq's speed check does (fresh, into its cache) and show the verdicts."""

    from qcompiler.cost_model import storage_dtype, storage_width
    from qcompiler.cpu import detect_cpu
    from qcompiler.json_output import write_json
    from qcompiler.latency_table import representative_layers
    import onnxruntime as ort

    from qcompiler.layer_speed import cache_key, cpu_label, decide, threads, timed_layer

    width = spec.bits.default or spec.weights.bits
    dtype = storage_dtype(spec, width)
    label = cpu_label()
    rows = Table(title=f"Per-layer speed, target '{spec.name}', {detect_cpu().summary()}, onnxruntime {ort.__version__}, {threads()} threads")
    for col in ("layer", "op", "input", f"{dtype} ms", "float ms", "ratio", "float as", "verdict"):
        rows.add_column(col, justify="left" if col in ("layer", "op", "input", "float as", "verdict") else "right")
    rows.caption = "float ms: the layer in float between a DequantizeLinear and a QuantizeLinear, as onnxruntime runs that; ratio: median per-cycle int/float time"
    records, seen = [], set()
    with _progress("timing layers", None) as bar:
        for layer in [l for l in (layers or representative_layers()) if l.op_type in spec.ops.quantized]:
            # Measured afresh once per shape (into the cache compiles read); repeats read it back.
            key = repr(cache_key(layer, spec, dtype))
            timing = timed_layer(layer, spec, storage_width(width, spec.bits.native), dtype, refresh=key not in seen)
            seen.add(key)
            keep, note = decide(timing, spec.speed, label, dtype)
            rows.add_row(layer.name, layer.op_type, "x".join(map(str, layer.input_shape[1:])), f"{timing.quantized_ms:.4f}", f"{timing.float_ms:.4f}", f"{timing.slowdown:.2f}", timing.float_runs_as, "float" if keep else "quantized")
            records.append({"layer": layer.name, "op_type": layer.op_type, "input_shape": list(layer.input_shape), "weight_shape": list(layer.weight.shape), "weight_dtype": dtype, "float_ms": timing.float_ms, "quantized_ms": timing.quantized_ms, "slowdown": timing.slowdown, "slowdown_low": timing.slowdown_low, "float_runs_as": timing.float_runs_as, "decision": "float" if keep else "quantized", "note": note})
            bar.advance()
    out.print(rows)
    write_json(path, "layer-speed", {"cpu": detect_cpu().summary(), "onnxruntime": ort.__version__, "threads": threads(), "layers": records})
    out.print(f"wrote {path}")


try:  # typer >= 0.20 vendors click; older releases depend on it
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions


def _one_line(message: str) -> None:
    err.print(f"error: {' '.join(message.split())}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of ``qc``: one line for user errors, exit 2."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        # Without standalone mode, click returns (not raises) the code of a typer.Exit.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except QCError as exc:
        _one_line(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click_exceptions.ClickException as exc:
        _one_line(exc.format_message() + ("" if not isinstance(exc, click_exceptions.UsageError) else " (see qc --help)"))
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)


if __name__ == "__main__":
    main()
