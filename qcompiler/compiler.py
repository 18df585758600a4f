"""`compile()`: load, run the pipeline, save, verify. The CLI and the Python API both call this."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from qcompiler.accuracy_guard import WEIGHTS_SET_BY_PIPELINE, WIDTHS_CHOSEN, Goal, guard
from qcompiler.artifacts import emit_artifacts
from qcompiler.calibration import CALIBRATION_FACT
from qcompiler.codebook import FLOAT_WEIGHTS_FACT
from qcompiler.cost_model import predicted_speedup
from qcompiler.data import DataSource, InputSpec
from qcompiler.errors import QCError
from qcompiler.external_weights import check_model, external_dir, folder_of, keep_in_files
from qcompiler.input_checks import check_float_model
from qcompiler.ir import SOURCE_KEY, annotate_types, atomic_output_dir, from_proto, load_model, load_saved, model_bytes_on_disk, save_model, to_proto
from qcompiler.pass_manager import Instrument, Pass, PassContext, PassManager, ProgressFactory, null_progress
from qcompiler.pipeline import format_pipeline, parse_pipeline
from qcompiler.precision import FLOAT_LAYER_INPUTS_FACT, FLOAT_MODEL_FACT, WEIGHT_BITS_FACT
from qcompiler.report import KeptFloat, PassTiming, Report
from qcompiler.targets.spec import TargetSpec, load_target
from qcompiler.verify import kernel_gap_warnings, verify as verify_models


#: The accuracy guard's default goal: every output within 20 dB SQNR of the float model.
DEFAULT_MIN_SQNR_DB = 20.0
#: Without --data, the last fifth of the calibration samples, at most this many, is verified on.
MAX_HELD_OUT = 1000


@dataclass
class CompileResult:
    """The compiled model (in memory), its report, and where it was written (if it was)."""

    model: ir.Model
    report: Report
    output_dir: Path | None = None


def _as_data(data: str | os.PathLike | DataSource | None, model: ir.Model, count: int | None) -> DataSource | None:
    if data is None:
        return None
    specs = InputSpec.of_model(model)
    if isinstance(data, DataSource):
        return (data.head(count) if count else data).for_inputs(specs)
    return DataSource.from_npz(data, specs, count=count).for_inputs(specs)


def compile(  # noqa: A001 - the verb users expect: qcompiler.compile(...)
    model: str | os.PathLike | ir.Model,
    target: str | TargetSpec = "ort-cpu",
    calibration: str | os.PathLike | DataSource | None = None,
    pipeline: str | list[str | Pass] | None = None,
    *,
    calib_count: int | None = None,
    verify_data: str | os.PathLike | DataSource | None = None,
    verify: bool = True,
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    seed: int = 0,
    instruments: list[Instrument] | None = None,
    progress: ProgressFactory = null_progress,
    latency_runs: int = 50,
    cpu: str | None = None,
    min_sqnr: float | None = DEFAULT_MIN_SQNR_DB,
    max_drop: float | None = None,
    guard_fallback: bool | None = None,
) -> CompileResult:
    """Quantize ``model`` for ``target`` and verify it with onnxruntime.

    A target whose kernels depend on the CPU (``[cpu]`` in its file) is compiled for the CPU this
    runs on, or for the ISA ``cpu`` names (``"avx2"``, ``"avx512-vnni"``, ...).

    ``pipeline`` defaults to the target's own. ``verify_data`` is what the report's accuracy and
    SQNR are measured on; without it the last fifth of the calibration data (at most
    `MAX_HELD_OUT` samples) is held out from calibration and verified on instead.

    The accuracy guard (`qcompiler.accuracy_guard`) then checks the model as onnxruntime runs it
    against ``min_sqnr`` (dB, every output; None: no bound) and ``max_drop`` (top-1 points, needs
    labels) and puts the most damaging layers back in float until both hold; the report's
    ``guard`` says what it reached and did. Both None turn it off. ``guard_fallback`` None: fall
    back unless assign-precision chose the widths under a budget (the guard then only measures,
    since a fallback would break the budget); True or False to decide. With ``output_dir`` the model and
    ``report.json`` are written there atomically (all or nothing). The input file is never changed.
    """
    start = time.perf_counter()
    spec = target if isinstance(target, TargetSpec) else load_target(target, cpu=cpu)
    if isinstance(model, ir.Model):
        # Passes rewrite in place: work on a copy so the caller's model stays as it was.
        float_proto = to_proto(model)
        ir_model, float_name = from_proto(float_proto), model.graph.name or "<in-memory model>"
        annotate_types(ir_model)
    else:
        ir_model, float_name = load_model(model), str(model)
        # Keep the float original for verification before any pass touches the IR.
        float_proto = to_proto(ir_model)
    check_float_model(ir_model, float_name)
    calib = _as_data(calibration, ir_model, calib_count)
    check = _as_data(verify_data, ir_model, None) if verify_data is not None else calib
    if verify and verify_data is None and calib is not None and calib.num_samples >= 2 * (calib.fixed_batch or 1):
        # Never verify on what was calibrated on: hold the last samples out (whole fixed batches).
        step = calib.fixed_batch or 1
        held = max(step, min(MAX_HELD_OUT, calib.num_samples // 5) // step * step)
        calib, check = calib.split(held)
    goal = Goal(min_sqnr, max_drop) if (min_sqnr is not None or max_drop is not None) else None
    manager = parse_pipeline(pipeline if pipeline is not None else spec.pipeline)
    ctx = PassContext(target=spec, data=calib, seed=seed, progress=progress, instruments=list(instruments or []))
    ctx.facts[FLOAT_MODEL_FACT] = float_proto

    # The pipeline's model is handed to run() through this list so that no frame but run's holds
    # it: a model over 2 GB is then dropped for the copy written to disk before verification.
    pending = [ir_model]
    del ir_model

    def run(folder: Path | None) -> CompileResult:
        compiled = manager.run(pending.pop(), ctx).model
        guard_report = None
        if goal is not None and verify and check is not None:
            # Widths under a budget, pruning, clustering and retraining are losses the user asked
            # for (the latter leave no float layer to fall back on): measured and reported.
            because = None
            if guard_fallback is None:
                because = WIDTHS_CHOSEN if WEIGHT_BITS_FACT in ctx.facts else WEIGHTS_SET_BY_PIPELINE if FLOAT_WEIGHTS_FACT in ctx.facts else None
            fall_back = guard_fallback if guard_fallback is not None else because is None
            compiled, guard_report = guard(float_proto, compiled, ctx.facts.get(FLOAT_LAYER_INPUTS_FACT, {}), check, goal, optimize=spec.verify_optimization == "all", progress=progress,
                                           fall_back=fall_back, measured_only_because=because or WIDTHS_CHOSEN)
        quant_proto = to_proto(compiled)
        try:
            check_model(quant_proto)
        except Exception as exc:
            raise QCError(f"compiled model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
        if folder is not None:
            quant_proto = None  # verified from the file written below
        report = _report(float_name, manager, spec, ctx)
        report.guard = asdict(guard_report) if guard_report is not None else None
        if spec.machine is not None:
            report.machine = {"cpu": spec.machine.cpu, "isa": spec.machine.isa, "accumulation": spec.machine.accumulation, "reason": spec.machine.reason}
        report.compile_seconds = time.perf_counter() - start
        model_path = None
        if folder is not None:
            model_path = folder / "model.onnx"
            if folder_of(float_proto) is not None:
                # A model whose weights stay in files (over 2 GB): written with external data, and
                # from here on held as written (weights read from the output's file), not with
                # its new integer weights in memory, so verification has the memory.
                save_model(compiled, model_path, external=True)
                compiled = load_saved(model_path)
                # The IR's nodes and values refer to each other: the rewritten model goes only
                # when the cycle collector runs, and verification needs that memory now.
                gc.collect()
            else:
                save_model(compiled, model_path)
            report.quantized_model = str(Path(output_dir) / "model.onnx")
            written = emit_artifacts(compiled, spec, folder, ctx.facts.get(WEIGHT_BITS_FACT))
            report.artifacts = [str(Path(output_dir) / p.name) for p in written]
        if verify and check is not None:
            if verify_data is None and check is calib:
                report.diagnostics.append({"pass": None, "node": None, "level": "warning", "message": "verified on the calibration data (too few samples to hold any out): figures are optimistic; pass --data with held-out samples"})
            report.verification = verify_models(float_proto, model_path if model_path else quant_proto, check, progress=progress, latency_runs=latency_runs, optimize=spec.verify_optimization == "all")
            for message in kernel_gap_warnings(report.verification):
                report.diagnostics.append({"pass": None, "node": None, "level": "warning", "message": message})
            report.verification.size.float_bytes = _float_size(model, float_proto)
            if report.verification.latency is not None:
                report.verification.latency.predicted_speedup = predicted_speedup(compiled, spec, ctx.facts.get(WEIGHT_BITS_FACT))
            _attach_layer_sqnr(report, compiled)
        if folder is not None:
            (folder / "report.json").write_text(report.to_json())  # inside the atomic output folder
        return CompileResult(compiled, report, Path(output_dir) if output_dir is not None else None)

    if output_dir is None:
        return run(None)
    inputs = tuple(str(p) for p in (model, calibration, verify_data, spec.path) if isinstance(p, (str, os.PathLike)) and p)
    with atomic_output_dir(output_dir, force=force, keep=inputs) as tmp:
        result = run(tmp)
    if external_dir(result.model) is not None:
        keep_in_files(result.model, output_dir)  # the temporary folder is now output_dir
    return result


def _attach_layer_sqnr(report: Report, compiled: ir.Model) -> None:
    """Give each layer of assign-precision's stats the measured SQNR of its output tensor.

    The precision pass ran before the rewrite, so it only knows weights; in the compiled graph a
    weight's DequantizeLinear carries the weight's name (qc.source), and the node reading it
    produces the tensor the verifier compared (renamed by folding and fusion to the float name).
    """
    stats = next((p.stats for p in reversed(report.passes) if p.name == "assign-precision"), None)
    if not stats or "layers" not in stats or report.verification is None:
        return
    measured = {l.tensor: l.sqnr_db for l in report.verification.layers}
    for node in compiled.graph:
        if node.op_type != "DequantizeLinear" or node.metadata_props.get(SOURCE_KEY) not in stats["layers"]:
            continue
        layer = stats["layers"][node.metadata_props[SOURCE_KEY]]
        for consumer in node.outputs[0].consumers():
            name = consumer.outputs[0].name
            if name in measured:
                layer["output"], layer["sqnr_db"] = name, measured[name]


def _float_size(model: str | os.PathLike | ir.Model, proto: onnx.ModelProto) -> int:
    return proto.ByteSize() if isinstance(model, ir.Model) else model_bytes_on_disk(model)


def _report(float_name: str, manager: PassManager, spec: TargetSpec, ctx: PassContext) -> Report:
    calibration = None
    analysis = ctx.facts.get(CALIBRATION_FACT)
    if analysis is not None and ctx.data is not None:
        calibration = {"method": analysis.method, "percentile": analysis.percentile, "samples": ctx.data.usable_samples, "data": ctx.data.origin}
    kept = []
    diagnostics = []
    for d in ctx.diagnostics:
        if d.level == "float":
            kept.append(KeptFloat(node=d.node or "", op_type=d.op_type or "", reason=d.message))
        else:
            diagnostics.append({"pass": d.pass_name, "node": d.node, "level": d.level, "message": d.message})
    return Report(
        float_model=float_name,
        quantized_model="<in memory>",
        target=spec.name,
        pipeline=format_pipeline(manager.passes),
        calibration=calibration,
        passes=[PassTiming(name, seconds, modified, stats) for name, seconds, modified, stats in ctx.timings],
        kept_float=kept,
        diagnostics=diagnostics,
    )


def verify(
    float_model: str | os.PathLike | onnx.ModelProto,
    quant_model: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike | DataSource,
    *,
    count: int | None = None,
    progress: ProgressFactory = null_progress,
    latency_runs: int = 50,
) -> Report:
    """Compare any float model with any quantized version of it (ours or another tool's)."""
    if not isinstance(data, DataSource):
        float_ir = load_model(float_model) if not isinstance(float_model, onnx.ModelProto) else ir.serde.deserialize_model(float_model)
        if not isinstance(quant_model, onnx.ModelProto):
            load_model(quant_model)  # a bad quantized file gets the same one-line error
        data = DataSource.from_npz(data, InputSpec.of_model(float_ir), count=count, count_option="--count")
    elif count:
        data = data.head(count)
    verification = verify_models(float_model, quant_model, data, progress=progress, latency_runs=latency_runs)
    report = Report(float_model=str(float_model) if not isinstance(float_model, onnx.ModelProto) else "<in memory>", quantized_model=str(quant_model) if not isinstance(quant_model, onnx.ModelProto) else "<in memory>")
    report.verification = verification
    return report
