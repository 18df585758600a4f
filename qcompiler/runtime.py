"""onnxruntime sessions for qcompiler's own numeric checks (calibration, verify-each, the verifier)."""

from __future__ import annotations

import re

from collections.abc import Iterable

import onnx
import onnxruntime as ort

from qcompiler.errors import QCError
from qcompiler.external_weights import folder_of


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
    # Fatal only: a failing run surfaces once, as run_checked's one line, not also as C++ log text.
    options.log_severity_level = 4
    return options


def make_session(model: onnx.ModelProto | str, *, optimize: bool = True, what: str = "model", threads: int = 0, prepack: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session (``threads`` intra-op threads, 0: onnxruntime's default); a
    model onnxruntime refuses becomes a one-line `QCError`. ``prepack`` False: for a float model
    whose weights stay in files, onnxruntime does not copy them into its kernels' layout."""
    source = model if isinstance(model, str) else model.SerializeToString()
    options = session_options(optimize=optimize, threads=threads)
    folder = None if isinstance(model, str) else folder_of(model)
    if folder is not None:
        # Weights kept in their files (a model over 2 GB): onnxruntime maps them from there.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        if not prepack:
            # Prepacking copies every float MatMul weight into the kernel's layout: the mapped
            # file plus a second copy of the model. The float reference needs no kernel layout.
            options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
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
        if name in existing or not name:  # "": an optional output left out, nothing to return
            continue
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.CopyFrom(types[name])
        copy.graph.output.append(vi)
        existing.add(name)
    return copy


def run_checked(session: ort.InferenceSession, names: list[str] | None, feeds: dict, *, what: str, data: str | None = None) -> list:
    """``session.run``, with onnxruntime's failures (a node it cannot run, an index out of range in
    the data) as one QCError line naming the model, the data file and the node, not C++ text."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own pybind11 exception types
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        text = " ".join(str(exc).split())
        node = re.search(r"Name:'([^']*)'", text)
        message = re.search(r"Status Message: (.*)", text)
        detail = (message.group(1) if message else text)[:300]
        raise QCError(f"onnxruntime failed running the {what}" + (f" on {data}" if data else "") + f": {detail}",
                      node=node.group(1) if node and node.group(1) else None) from None
