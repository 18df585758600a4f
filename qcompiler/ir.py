"""IR glue on top of ``onnx_ir``: safe loading, atomic saving, fresh names and provenance."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.external_weights import adopt, external_dir, keep_in_files, mark

#: Metadata key on every node or value a pass created: the name of that pass.
PROVENANCE_KEY = "qc.pass"
#: Metadata key on a value that stands for a float tensor of the original model under another name
#: (e.g. the DequantizeLinear output that replaced a fused Relu's output).
SOURCE_KEY = "qc.source"

# Above this many bytes of initializers a model is saved with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into the IR, turning every way a file can be unreadable into a `QCError`.

    External data is resolved against the model's folder and refused when it points outside it
    (a model file must not make us read arbitrary files).
    """
    path = Path(path)
    if not path.exists():
        raise QCError("no such file", file=str(path))
    if path.is_dir():
        raise QCError("is a directory, expected an .onnx file", file=str(path))
    try:
        # The checker reads the file itself (large models included) and names the node at fault.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise QCError(f"not a valid ONNX model: {_first_line(exc)}", file=str(path)) from None
    except Exception as exc:
        raise QCError(f"not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})", file=str(path)) from None
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several unrelated types for a bad file
        raise QCError(f"not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})", file=str(path)) from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise QCError("not a readable ONNX model (empty graph: truncated or not ONNX?)", file=str(path))
    base = path.resolve().parent
    for graph in model.graphs():
        for init in graph.initializers.values():
            if isinstance(init.const_value, ir.ExternalTensor):
                _check_external(init.name, init.const_value, base, path)
    if initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        # Small enough to hold: read external weights into memory once.
        ir.external_data.load_to_model(model)
    else:
        # Larger models keep their weights in their files, read a tensor at a time
        # (qcompiler.external_weights); onnxruntime maps them from there.
        keep_in_files(model)
    try:
        _check_structure(model)
    except QCError:
        raise
    except Exception as exc:
        raise QCError(f"not a valid ONNX model ({_first_line(exc)})", file=str(path)) from None
    annotate_types(model)
    return model


def _check_external(name: str, tensor: ir.ExternalTensor, base: Path, path: Path) -> None:
    """Refuse external data outside the model's folder (symlinks resolved), missing, or whose
    offset and length do not lie inside its file or do not match the tensor's size."""
    target = (Path(tensor.base_dir) / tensor.location).resolve()
    if base not in target.parents and target != base:
        raise QCError(f"external data '{tensor.location}' of '{name}' lies outside the model's folder", file=str(path))
    if not target.is_file():
        raise QCError(f"external data file '{tensor.location}' of '{name}' is missing", file=str(path))
    size = target.stat().st_size
    offset = tensor.offset or 0
    shape = list(tensor.shape.numpy())
    expected = math.ceil(math.prod(shape) * tensor.dtype.itemsize)
    length = tensor.length if tensor.length is not None else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise QCError(f"external data of '{name}' (offset {offset}, length {length}) lies outside '{tensor.location}' ({size} bytes)", file=str(path))
    if length != expected:
        raise QCError(f"external data of '{name}' has length {length} in '{tensor.location}' but its {tensor.dtype.name} shape {shape} needs {expected} bytes", file=str(path))


def annotate_types(model: ir.Model) -> None:
    """Give every value a dtype (and shape where known) if some lack one.

    Passes decide what is float data from value types; exporters often leave intermediate
    values untyped, so this runs at import and wherever a pass needs types.
    """
    if all(v.dtype is not None for node in model.graph for v in node.outputs if v.name):
        return
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)


def _check_structure(model: ir.Model) -> None:
    if not model.graph.outputs:
        raise QCError("model has no outputs")
    if "" not in model.opset_imports and "ai.onnx" not in model.opset_imports:
        raise QCError("model imports no default ONNX opset")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def opset_version(model: ir.Model) -> int:
    """The default-domain opset the model imports."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def upgraded_to(model: ir.Model, opset: int, pass_name: str, why: str) -> tuple[ir.Model, int | None]:
    """``model`` at ``opset`` or above (the ONNX version converter, when it is below), and the
    opset it had if it was upgraded (None otherwise). A model the converter cannot take is a
    QCError naming ``pass_name`` and ``why`` it needed the upgrade."""
    old = opset_version(model)
    if old >= opset:
        return model, None
    import onnx.version_converter

    try:
        upgraded = onnx.version_converter.convert_version(to_proto(model), opset)
    except Exception as exc:
        raise QCError(f"model opset {old} is below {opset} ({why}) and could not be converted: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", pass_name=pass_name) from None
    # The converter keeps the IR version; a new opset may need a newer one (the checker refuses
    # opset 13 in IR 3, where every initializer also had to be a graph input).
    needed = onnx.helper.find_min_ir_version_for(list(upgraded.opset_import), ignore_unknown=True)
    if upgraded.ir_version < needed:
        if upgraded.ir_version < 4:
            constants = {t.name for t in upgraded.graph.initializer}
            kept = [v for v in upgraded.graph.input if v.name not in constants]
            del upgraded.graph.input[:]
            upgraded.graph.input.extend(kept)
        upgraded.ir_version = needed
    return from_proto(upgraded), old


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (the model's weights) as stored."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize the IR into a protobuf (in memory; for onnxruntime and the checker). Weights
    kept in their files stay there: the protobuf records their folder (`make_session` and
    `from_proto` find them through it)."""
    return mark(ir.serde.serialize_model(model), external_dir(model))


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """The IR of a protobuf `to_proto` made (weights kept in files are read from there again)."""
    return adopt(ir.serde.deserialize_model(proto))


def copy_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` whose graph can be rewritten independently. Tensors are shared, not
    copied (passes replace a weight by a new tensor, never write into one): a trial copy of a
    large model costs its nodes, not its weights again."""
    return model.clone()


def save_model(model: ir.Model, path: str | os.PathLike, *, external: bool = False) -> None:
    """Save ``model`` to ``path``; large models (or ``external``) get their weights in
    ``<name>.data`` beside it.

    The caller is expected to write into a temporary folder and rename it (see `atomic_output_dir`),
    so a crash never leaves a half-written model where the user looks for it.
    """
    path = Path(path)
    if external or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD or external_dir(model) is not None:
        # Weights still in the input's files are copied into the output's own data file
        # (file to file), so the output never points back at the input's folder.
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def load_saved(path: str | os.PathLike) -> ir.Model:
    """A model `save_model` just wrote, its weights read from its own files (no checks: ours)."""
    model = ir.load(path)
    keep_in_files(model, Path(path).parent)
    return model


def model_bytes_on_disk(path: str | os.PathLike) -> int:
    """Size of an ONNX file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen: set[str] = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                extra = path.parent / entry.value
                if extra.exists():
                    total += extra.stat().st_size
    return total


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file beside ``path`` and rename it over ``path``, so
    a reader never sees a half-written file (and an interrupted write leaves the old one)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


class atomic_output_dir:
    """Context manager: build an output folder under a temporary name, move it in place on success.

    The destination must be absent or empty unless ``force`` is given; on any exception the
    temporary folder is removed and the destination is left as it was.
    """

    def __init__(self, dest: str | os.PathLike, *, force: bool = False, keep: tuple[str | os.PathLike, ...] = ()) -> None:
        self.dest = Path(dest)
        self.force = force
        self.keep = [Path(p) for p in keep]
        self.tmp: Path | None = None
        self.created: Path | None = None

    def __enter__(self) -> Path:
        dest = self.dest.resolve()
        for path in self.keep:
            resolved = path.resolve()
            if dest == resolved or dest in resolved.parents:
                # Replacing the folder would delete an input the user asked us to read.
                raise QCError(f"output folder contains the input '{path}'; choose another -o", file=str(self.dest))
        if self.dest.exists():
            if not self.dest.is_dir():
                raise QCError("output path exists and is not a folder", file=str(self.dest))
            if any(self.dest.iterdir()) and not self.force:
                raise QCError("output folder is not empty (pass --force to replace it)", file=str(self.dest))
        # Folders created for the output are removed again if the compile fails.
        missing = [p for p in (self.dest.parent, *self.dest.parent.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QCError(f"cannot create the output folder ({exc.strerror}: '{exc.filename}')", file=str(self.dest)) from None
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        # mkdtemp makes the folder private (0700); the output is an ordinary folder: honour umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.created is not None:
                shutil.rmtree(self.created, ignore_errors=True)
            return
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)


class NameAuthority:
    """Hands out node and value names not yet used anywhere in a graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self._used: set[str] = set()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self._used.add(node.name)
            for value in node.outputs:
                if value.name:
                    self._used.add(value.name)
        for value in [*graph.inputs, *graph.initializers.values()]:
            if value.name:
                self._used.add(value.name)

    def fresh(self, base: str) -> str:
        """A name starting with ``base`` that nothing in the graph uses yet."""
        name, i = base, 1
        while name in self._used:
            name = f"{base}_{i}"
            i += 1
        self._used.add(name)
        return name


def iter_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the top-level graph: inputs, initializers and node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def is_float_tensor(value: ir.Value | None) -> bool:
    """True for values with a floating-point element type."""
    return value is not None and value.dtype is not None and value.dtype.is_floating_point()


def constant_array(value: ir.Value | None):
    """The numpy array of a constant value (initializer or folded Constant), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def add_initializer(graph: ir.Graph, names: NameAuthority, base: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new initializer under a fresh name, with its dtype and shape set."""
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array)
    value = ir.Value(name=names.fresh(base), const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(list(tensor.shape)))
    graph.register_initializer(value)
    return value
