"""Verify a quantized model against its float original with onnxruntime.

Works on any pair of models, including ones made by other tools: outputs are matched by name,
intermediate tensors by provenance (``qc.source`` on our DequantizeLinear outputs) or, for other
tools' models, by the name of the tensor a QuantizeLinear/DequantizeLinear pair re-creates.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler.data import DataSource, InputSpec
from qcompiler.errors import QCError
from qcompiler.external_weights import folder_of, mark
from qcompiler.ir import SOURCE_KEY, model_bytes_on_disk
from qcompiler.pass_manager import ProgressFactory, null_progress
from qcompiler.quant.uniform import dequantize
from qcompiler.report import LatencyMetrics, LayerMetrics, OutputMetrics, SizeMetrics, VerificationReport
from qcompiler.runtime import make_session, with_extra_outputs, run_checked


@dataclass
class _Accumulator:
    """Streaming SQNR / max-error sums for one tensor pair."""

    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    agree: int = 0
    count: int = 0
    nonfinite: int = 0

    def update(self, ref: np.ndarray, got: np.ndarray, classify: bool) -> None:
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        bad = ~np.isfinite(got64)
        if bad.any():
            self.nonfinite += int(bad.sum())
            got64 = np.where(bad, 0.0, got64)
        diff = ref64 - got64
        self.signal += float(np.sum(ref64**2))
        self.noise += float(np.sum(diff**2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)
        if classify:
            self.agree += int(np.sum(ref.argmax(axis=-1) == got.argmax(axis=-1)))
            self.count += ref.shape[0]

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return 10.0 * float(np.log10(self.signal / self.noise))


def load_proto(model: str | os.PathLike | onnx.ModelProto, what: str) -> onnx.ModelProto:
    """A model as protobuf; a path is read with its external data, or a one-line error names it."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise QCError("no such file", file=str(path))
    try:
        # External weights stay in their files: onnxruntime maps them from the model's folder.
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise QCError(f"not a readable ONNX model ({type(exc).__name__})", file=str(path)) from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        mark(proto, str(path.resolve().parent))
    if not proto.graph.output:
        raise QCError(f"not a readable ONNX model (the {what} has no outputs)", file=str(path))
    return proto


def _is_classifier_output(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[1] > 1


def match_intermediates(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """Float tensor name -> (quantized model tensor, float producer node, its op type)."""
    float_outputs = {o.name for o in float_model.graph.output}
    producers = {}
    for node in float_model.graph.node:
        for out in node.output:
            if out:  # "" is an optional output left out (a GRU's Y when only Y_h is used)
                producers[out] = node
    quant_values: dict[str, str] = {}
    q_inputs = {node.output[0]: node.input[0] for node in quant_model.graph.node if node.op_type == "QuantizeLinear"}
    quant_names = {out for node in quant_model.graph.node for out in node.output} | {i.name for i in quant_model.graph.input}
    for node in quant_model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = next((p.value for p in node.metadata_props if p.key == SOURCE_KEY), None)
        if source is None and node.input[0] in q_inputs:
            source = q_inputs[node.input[0]]
        if source is not None:
            quant_values.setdefault(source, node.output[0])
    matches = {}
    for name, node in producers.items():
        if name in float_outputs or node.op_type in ("Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Cast", "ConstantOfShape"):
            continue
        if name in quant_values:
            matches[name] = (quant_values[name], node.name or name, node.op_type)
        elif name in quant_names:
            matches[name] = (name, node.name or name, node.op_type)
    return matches


BLOCK_WARMUP = 2  # untimed runs at the start of each block: the first run after a switch is cold
# Per-layer comparison holds every intermediate tensor of both models for one batch: keep it small.
LAYER_BATCH = 8
#: Per-layer samples for a model run one session at a time (its float tensors are all kept).
ONE_AT_A_TIME_LAYER_SAMPLES = 32


def interleaved_latency(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], *, cycles: int, block: int, feeds: list[dict[str, np.ndarray]] | None = None) -> tuple[list[float], list[float]]:
    """Block-interleaved timing: (median ms per session, speedup of each over ``sessions[0]``).

    Every cycle runs each session for BLOCK_WARMUP untimed + ``block`` timed runs in turn, so a
    load drift on the machine hits all models alike, while each model still runs back to back
    with its weights in cache, as deployed (alternating single runs times cold-cache runs
    instead). The order rotates every cycle so no model always follows the same one. The speedup
    is the median over cycles of the first session's block median divided by the model's block
    median: each ratio pairs runs seconds apart, so drift cancels. ``feeds`` gives each session
    its own input where their inputs differ (a layer timed with integer input).
    """
    feeds = feeds or [feed] * len(sessions)
    for s, f in zip(sessions, feeds):  # first runs allocate buffers and pick kernels
        for _ in range(3):
            s.run(None, f)
    times: list[list[list[float]]] = [[[] for _ in range(cycles)] for _ in sessions]
    n = len(sessions)
    for cycle in range(cycles):
        for i in [(cycle + j) % n for j in range(n)]:
            s, f = sessions[i], feeds[i]
            for k in range(BLOCK_WARMUP + block):
                start = time.perf_counter()
                s.run(None, f)
                if k >= BLOCK_WARMUP:
                    times[i][cycle].append(time.perf_counter() - start)
    ms = [float(np.median(np.concatenate(t))) * 1e3 for t in times]
    speedups = [float(np.median([np.median(f) / np.median(m) for f, m in zip(times[0], t)])) for t in times]
    return ms, speedups


def measure_latency(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto, feed: dict[str, np.ndarray], *, runs: int = 50, block: int = 10, optimize: bool = True, one_at_a_time: bool = False) -> LatencyMetrics:
    """Latency of both models with the same session options, timed by `interleaved_latency`;
    ``one_at_a_time``: each model timed alone with only its session open (a model whose weights
    stay in files: two sessions would hold both models' weights at once)."""
    block = max(1, min(block, runs))
    cycles = max(1, runs // block)
    if one_at_a_time:
        f_ms, q_ms = (interleaved_latency([make_session(p, optimize=optimize, what=w)], feed, cycles=cycles, block=block)[0][0]
                      for p, w in ((float_proto, "float model"), (quant_proto, "quantized model")))
    else:
        sessions = [make_session(p, optimize=optimize, what=w) for p, w in ((float_proto, "float model"), (quant_proto, "quantized model"))]
        (f_ms, q_ms), _ = interleaved_latency(sessions, feed, cycles=cycles, block=block)
    batch = next(iter(feed.values())).shape[0]
    # The report shows both medians, so its speedup is their ratio (the bench, which compares
    # several tools, uses the drift-cancelling per-cycle ratios instead).
    return LatencyMetrics(float_ms=f_ms, quantized_ms=q_ms, speedup=f_ms / q_ms, runs=cycles * block, batch=batch)


def _weight_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else (n + 1) // 2
    return total


def verify(
    float_model: str | os.PathLike | onnx.ModelProto,
    quant_model: str | os.PathLike | onnx.ModelProto,
    data: DataSource,
    *,
    per_layer: bool = True,
    layer_samples: int = 256,
    latency_runs: int = 50,
    batch_size: int = 64,
    progress: ProgressFactory = null_progress,
    optimize: bool = True,
) -> VerificationReport:
    """Run both models on ``data`` and measure output agreement, per-layer error, size and latency.

    ``optimize`` False runs both at onnxruntime's basic optimization level, for models whose
    numerics its extended fusions change (see a target's ``[verify]``).
    """
    float_proto = load_proto(float_model, "float model")
    quant_proto = load_proto(quant_model, "quantized model")
    f_inputs = [i.name for i in float_proto.graph.input if i.name not in {t.name for t in float_proto.graph.initializer}]
    q_inputs = [i.name for i in quant_proto.graph.input if i.name not in {t.name for t in quant_proto.graph.initializer}]
    if sorted(f_inputs) != sorted(q_inputs):
        raise QCError(f"the models take different inputs: {f_inputs} vs {q_inputs}", file=str(quant_model) if not isinstance(quant_model, onnx.ModelProto) else None)
    missing_data = [n for n in f_inputs if n not in data.arrays]
    if missing_data:
        raise QCError(f"no array for model input '{missing_data[0]}'", file=data.origin)
    output_names = [o.name for o in float_proto.graph.output]
    quant_outputs = {o.name for o in quant_proto.graph.output}
    if missing := [n for n in output_names if n not in quant_outputs]:
        raise QCError(f"the quantized model has no output '{missing[0]}' (outputs are matched by name)", file=str(quant_model) if not isinstance(quant_model, onnx.ModelProto) else None)

    data = data.for_inputs(InputSpec.of_proto(float_proto))
    matches = match_intermediates(float_proto, quant_proto) if per_layer else {}
    # A model whose weights stay in files (over 2 GB) runs one session at a time: the float
    # outputs are kept and the float session closed before the quantized model opens.
    one_at_a_time = folder_of(float_proto) is not None
    float_out = _outputs(float_proto, output_names, data, batch_size, "float model", optimize, prepack=False)
    quant_out = _outputs(quant_proto, output_names, data, batch_size, "quantized model", optimize)
    # As run (integer kernels) and as the graph says (Q/DQ in float): a gap between the two
    # means the kernels do not compute what was verified in simulation (saturation, fusion bugs).
    simulated_out = _outputs(quant_proto, output_names, data, batch_size, "quantized model", False) if optimize else None
    accs = {n: _Accumulator() for n in output_names}
    simulated = {n: _Accumulator() for n in output_names}
    correct_f = correct_q = labelled = 0
    total_batches = len(range(0, data.usable_samples, data.fixed_batch or batch_size))
    if one_at_a_time:
        float_out = list(float_out)
    # The simulated session runs beside the others, or after the as-run one has closed.
    beside, after = (None, simulated_out) if one_at_a_time else (simulated_out, None)
    with progress("verifying", total_batches + (1 if matches else 0)) as bar:
        start = 0
        for f_list, q_list, s_list in zip(float_out, quant_out, beside if beside is not None else itertools.repeat(None)):
            f_out, q_out = dict(zip(output_names, f_list)), dict(zip(output_names, q_list))
            for name in output_names:
                accs[name].update(f_out[name], q_out[name], _is_classifier_output(f_out[name].shape))
            if s_list is not None:
                for name, got in zip(output_names, s_list):
                    simulated[name].update(f_out[name], got, False)
            if data.labels is not None and _is_classifier_output(f_out[output_names[0]].shape):
                labels = data.labels[start : start + len(f_out[output_names[0]])]
                correct_f += int(np.sum(f_out[output_names[0]].argmax(-1) == labels))
                correct_q += int(np.sum(q_out[output_names[0]].argmax(-1) == labels))
                labelled += len(labels)
            start += len(f_out[output_names[0]])
            bar.advance()
        _close(quant_out)  # zip stops at the shorter list: the session would stay open
        if after is not None:
            for f_list, s_list in zip(float_out, after):
                for name, ref, got in zip(output_names, f_list, s_list):
                    simulated[name].update(ref, got, False)
        _close(simulated_out)
        samples = min(layer_samples, ONE_AT_A_TIME_LAYER_SAMPLES) if one_at_a_time else layer_samples
        layers = _per_layer(float_proto, quant_proto, matches, data.head(samples), LAYER_BATCH, as_run=optimize, one_at_a_time=one_at_a_time) if matches else []
        if matches:
            bar.advance()
    outputs = [
        OutputMetrics(name=n, sqnr_db=a.sqnr_db, max_abs_error=a.max_abs, top1_agreement=(a.agree / a.count if a.count else None), nonfinite=a.nonfinite, sqnr_db_simulated=simulated[n].sqnr_db if simulated_out is not None else None)
        for n, a in accs.items()
    ]
    feed = data.first_batch(1)
    latency = measure_latency(float_proto, quant_proto, feed, runs=latency_runs, optimize=optimize, one_at_a_time=one_at_a_time) if latency_runs > 0 else None
    size = SizeMetrics(
        float_bytes=float_proto.ByteSize() if isinstance(float_model, onnx.ModelProto) else model_bytes_on_disk(float_model),
        quantized_bytes=quant_proto.ByteSize() if isinstance(quant_model, onnx.ModelProto) else model_bytes_on_disk(quant_model),
        float_weight_bytes=_weight_bytes(float_proto),
        quantized_weight_bytes=_weight_bytes(quant_proto),
    )
    return VerificationReport(
        samples=data.usable_samples,
        data=data.origin,
        outputs=outputs,
        accuracy_float=correct_f / labelled if labelled else None,
        accuracy_quantized=correct_q / labelled if labelled else None,
        layers=layers,
        size=size,
        latency=latency,
        optimization="all" if optimize else "basic",
    )


#: A quantized model whose integer kernels lose more than this against its Q/DQ simulation is
#: not computing what was verified in simulation (saturating kernels, a fusion bug).
KERNEL_GAP_DB = 3.0


def kernel_gap_warnings(verification: VerificationReport, threshold_db: float = KERNEL_GAP_DB) -> list[str]:
    """Warnings for outputs and layers that onnxruntime's integer kernels compute more than
    ``threshold_db`` worse than the same graph with Q/DQ run in float, worst layers named."""
    warnings = []
    for o in verification.outputs:
        if o.sqnr_db_simulated is not None and o.sqnr_db_simulated - o.sqnr_db > threshold_db:
            warnings.append(f"output '{o.name}': SQNR {o.sqnr_db:.2f} dB as run by onnxruntime's integer kernels, {o.sqnr_db_simulated:.2f} dB with Q/DQ in float")
    gaps = sorted(((l.sqnr_db - l.sqnr_db_as_run, l) for l in verification.layers if l.sqnr_db_as_run is not None and l.sqnr_db - l.sqnr_db_as_run > threshold_db), key=lambda g: -g[0])
    if gaps:
        named = ", ".join(f"{l.node} ({l.sqnr_db_as_run:.1f} dB as run vs {l.sqnr_db:.1f} simulated)" for _, l in gaps[:5])
        more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
        warnings.append(f"{len(gaps)} layer(s) lose more than {threshold_db:g} dB in the integer kernels: {named}{more}")
    return warnings


def _outputs(proto: onnx.ModelProto, names: list[str], data: DataSource, batch_size: int, what: str, optimize: bool, *, prepack: bool = True) -> Iterator[list[np.ndarray]]:
    """``names`` of ``proto`` on each batch of ``data``; its session opens at the first batch and
    closes after the last (``prepack``: see `make_session`)."""
    session = make_session(proto, optimize=optimize, what=what, prepack=prepack)
    for batch in data.batches(batch_size):
        yield run_checked(session, names, batch, what=what, data=data.origin)


def _close(outputs: Iterator | list | None) -> None:
    """Close an `_outputs` generator (and its session) that a zip left suspended."""
    if outputs is not None and hasattr(outputs, "close"):
        outputs.close()


def _integer_sources(quant_proto: onnx.ModelProto, dq_outputs: list[str]) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """DequantizeLinear output -> (its QuantizeLinear's integer output, scale, zero point), for
    per-tensor activation quantizers: the integer tensor is what the fused kernels produce."""
    folder = folder_of(quant_proto) or ""
    wanted_consts = {name for node in quant_proto.graph.node if node.op_type == "DequantizeLinear" for name in node.input[1:3]}
    consts = {t.name: onnx.numpy_helper.to_array(t, base_dir=folder) for t in quant_proto.graph.initializer if t.name in wanted_consts}
    q_outputs = {n.output[0] for n in quant_proto.graph.node if n.op_type == "QuantizeLinear"}
    wanted, found = set(dq_outputs), {}
    for node in quant_proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in wanted and node.input[0] in q_outputs:
            scale = consts.get(node.input[1])
            zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
            if scale is not None and zp is not None and scale.size == 1:
                found[node.output[0]] = (node.input[0], scale.astype(np.float32).reshape(()), zp.reshape(()))
    return found


def _per_layer(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto, matches: dict[str, tuple[str, str, str]], data: DataSource, batch_size: int, as_run: bool = False, one_at_a_time: bool = False) -> list[LayerMetrics]:
    f_names = list(matches)
    q_names = [matches[n][0] for n in f_names]
    # Unoptimized sessions: exposing every intermediate defeats fusion anyway, and this keeps the
    # tensors exactly those the graphs name.
    float_out = _outputs(with_extra_outputs(float_proto, f_names), f_names, data, batch_size, "float model", False, prepack=False)
    quant_out = _outputs(with_extra_outputs(quant_proto, q_names), q_names, data, batch_size, "quantized model", False)
    # As run: the integer outputs of the QuantizeLinear nodes, exposed from a fully optimized
    # session (exposing them keeps onnxruntime's QLinear fusion; exposing the float DQ outputs
    # would not), dequantized here.
    integer = _integer_sources(quant_proto, q_names) if as_run else {}
    run_names = [integer[q][0] for q in q_names if q in integer]
    run_out = _outputs(with_extra_outputs(quant_proto, run_names), run_names, data, batch_size, "quantized model", True) if run_names else itertools.repeat([])
    if one_at_a_time:
        # Each session alone: the float tensors first, then each quantized session in turn.
        float_out = list(float_out)
        quant_out = list(quant_out)
    accs = {n: _Accumulator() for n in f_names}
    run_accs = {n: _Accumulator() for n in f_names}
    for f_out, q_out, run_list in zip(float_out, quant_out, run_out):
        run_out_batch = dict(zip(run_names, run_list))
        for name, q_name, ref, got in zip(f_names, q_names, f_out, q_out):
            # An integer tensor of the same name (data movement run on quantized values) is not
            # comparable with the float one; its DequantizeLinear output is matched instead.
            if ref.shape == got.shape and np.issubdtype(got.dtype, np.floating):
                accs[name].update(ref, got, False)
                if q_name in integer and integer[q_name][0] in run_out_batch:
                    _, scale, zp = integer[q_name]
                    codes = run_out_batch[integer[q_name][0]]
                    if codes.shape == ref.shape:
                        run_accs[name].update(ref, dequantize(codes, scale, zp), False)
    return [
        LayerMetrics(tensor=n, node=matches[n][1], op_type=matches[n][2], sqnr_db=accs[n].sqnr_db, max_abs_error=accs[n].max_abs,
                     sqnr_db_as_run=run_accs[n].sqnr_db if run_accs[n].signal > 0 else None)
        for n in f_names
        if accs[n].signal > 0 or accs[n].noise > 0
    ]

