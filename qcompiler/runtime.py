"""onnxruntime sessions for qcompiler's own numeric checks (calibration, verify-each, the verifier)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx
import onnxruntime as ort

from qcompiler.errors import QCError


def session_options(*, optimize: bool = True, threads: int = 0, spinning: bool = False) -> ort.SessionOptions:
    """The same options for every model we compare, so differences come from the models.

    Intra-op spinning is off unless asked for: on small shared machines spinning worker threads
    made float latency swing several-fold between trials, which turned every speedup into noise.
    """
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def make_session(model: onnx.ModelProto | str, *, optimize: bool = True, what: str = "model", threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session (``threads`` intra-op threads, 0: onnxruntime's default); a
    model onnxruntime refuses becomes a one-line `QCError`."""
    source = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, sess_options=session_options(optimize=optimize, threads=threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QCError(f"onnxruntime cannot load the {what}: {first[:300]}", file=model if isinstance(model, str) else None) from None


def with_extra_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the intermediate tensors ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    types = {vi.name: vi.type for vi in [*copy.graph.value_info, *copy.graph.input, *copy.graph.output]}
    for name in names:
        if name in existing:
            continue
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.CopyFrom(types[name])
        copy.graph.output.append(vi)
        existing.add(name)
    return copy
