"""Weights that stay in their files: models over protobuf's 2 GB limit, read one tensor at a time.

A model whose weights exceed protobuf's 2 GB cannot be serialized to bytes, so neither loaded
into memory whole nor handed to onnxruntime as bytes. Its weights stay in the external data files
they came in: the IR holds a `FileBackedTensor` per weight, which reads its bytes when a pass asks
and keeps nothing (onnx_ir's own external tensor maps the whole file and keeps the mapping, so
every weight ever read stays resident). Protobufs made from such a model (`to_proto`) carry the
folder the files are in (`EXTERNAL_DIR_KEY`), and onnxruntime sessions built from them read the
weights from there (memory-mapped by onnxruntime, not copied).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

#: Metadata key on a protobuf made from a model whose weights stay in files: the absolute folder
#: their relative locations are resolved against. Never written into a saved model.
EXTERNAL_DIR_KEY = "qc.external_data_dir"


class FileBackedTensor(ir.ExternalTensor):  # pylint: disable=too-many-ancestors
    """An external tensor read from its file on each use and never kept or memory-mapped, so a
    pass that reads every weight of a large model holds one weight at a time."""

    def numpy(self) -> np.ndarray:
        self._check_validity()
        self._check_path_containment()
        if self.size == 0 or self.dtype.bitwidth < 8:
            # Sub-byte types unpack through onnx_ir (rare in float models, small when present).
            return ir.ExternalTensor(self.location, self.offset, self.length, self.dtype, shape=self.shape, name=self.name, base_dir=self.base_dir).numpy().copy()
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        array = np.fromfile(self.path, dtype=dtype, count=self.size, offset=self.offset or 0)
        return array.reshape(self.shape.numpy())

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        self._check_validity()
        self._check_path_containment()
        with open(self.path, "rb") as f:
            f.seek(self.offset or 0)
            return f.read(self.length if self.length is not None else self.nbytes)


def keep_in_files(model: ir.Model, base_dir: str | os.PathLike | None = None) -> int:
    """Replace every external initializer of ``model`` (subgraphs included) by a `FileBackedTensor`
    resolved against ``base_dir`` (default: each tensor's own); return how many were replaced."""
    count = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor) or (isinstance(tensor, FileBackedTensor) and base_dir is None):
                continue
            folder = Path(base_dir if base_dir is not None else tensor.base_dir).resolve()
            value.const_value = FileBackedTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape, name=tensor.name, base_dir=str(folder))
            count += 1
    return count


def external_dir(model: ir.Model) -> str | None:
    """The folder the model's file-backed weights are in (None when every weight is in memory)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return str(Path(value.const_value.base_dir).resolve())
    return None


def mark(proto: onnx.ModelProto, folder: str | None) -> onnx.ModelProto:
    """Record in ``proto`` where its external weights are (see `EXTERNAL_DIR_KEY`)."""
    entries = [p for p in proto.metadata_props if p.key != EXTERNAL_DIR_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(entries)
    if folder is not None:
        proto.metadata_props.add(key=EXTERNAL_DIR_KEY, value=folder)
    return proto


def folder_of(proto: onnx.ModelProto) -> str | None:
    """The folder `mark` recorded in ``proto``, if any."""
    return next((p.value for p in proto.metadata_props if p.key == EXTERNAL_DIR_KEY), None)


def adopt(model: ir.Model) -> ir.Model:
    """After deserializing a marked protobuf: read its weights from the recorded folder, and drop
    the mark from the model (it must not reach a saved file)."""
    folder = model.metadata_props.pop(EXTERNAL_DIR_KEY, None)
    if folder is not None:
        keep_in_files(model, folder)
    return model


def check_model(proto: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(proto, full_check=True)``, finding weights kept in files.

    The checker resolves external locations against the working directory for a model in
    memory; for a marked protobuf it runs there (the folder is only read).
    """
    folder = folder_of(proto)
    if folder is None:
        onnx.checker.check_model(proto, full_check=True)
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        onnx.checker.check_model(proto, full_check=True)
    finally:
        os.chdir(previous)
