"""`DataSource`: samples for calibration and verification, read from an ``.npz`` file.

The file holds one array per model input, named after the input (a single array of any name is
accepted for a single-input model), first axis = samples, plus optional ``labels``. Arrays stored
uncompressed (``np.savez``) are memory-mapped, so a large calibration file is not read into memory
at once: retraining reads each batch from the file. A large compressed array
(``np.savez_compressed``) is inflated once into a temporary file and memory-mapped from there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.errors import QCError

LABELS_KEY = "labels"
#: A compressed array larger than this is inflated into a temporary file and memory-mapped,
#: never held in memory whole (smaller ones are read into memory).
INFLATE_TO_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class InputSpec:
    """What a model input accepts: name, numpy dtype and shape (None for a dynamic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @staticmethod
    def of_proto(model: onnx.ModelProto) -> list[InputSpec]:
        """Input specs of a serialized model (for models that are not loaded into the IR)."""
        initializers = {t.name for t in model.graph.initializer}
        specs = []
        for value in model.graph.input:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)) if tensor.elem_type else np.dtype(np.float32)
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim) if tensor.HasField("shape") else None
            specs.append(InputSpec(value.name, dtype, shape))
        return specs

    @staticmethod
    def of_model(model: ir.Model) -> list[InputSpec]:
        specs = []
        for value in model.graph.inputs:
            if value.name in model.graph.initializers:
                continue
            dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
            shape = None
            if value.shape is not None:
                shape = tuple(d if isinstance(d, int) else None for d in value.shape)
            specs.append(InputSpec(value.name, dtype, shape))
        return specs


@dataclass(frozen=True)
class _Member:
    """An .npy inside an .npz, known from its header alone (nothing read yet)."""

    key: str
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    stored: bool  # uncompressed: memory-mapped when read
    offset: int  # of the array data in the file, when stored

    @property
    def nbytes(self) -> int:
        """Bytes of array data the header declares."""
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def _read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read_header(fh)


def _member(path: Path, archive: zipfile.ZipFile, key: str) -> _Member:
    """The header of ``key`` (shape, dtype), read without inflating its data, checked against the
    member's size: a declared shape larger than the bytes behind it is refused before any read."""
    info = archive.getinfo(key + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with path.open("rb") as fh:
            fh.seek(info.header_offset)
            local_header = fh.read(30)
            name_len = int.from_bytes(local_header[26:28], "little")
            extra_len = int.from_bytes(local_header[28:30], "little")
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            start = fh.tell()
            shape, fortran, dtype = _read_npy_header(fh)
            offset = fh.tell()
        data_bytes = info.file_size - (offset - start)
    else:
        with archive.open(info) as fh:
            shape, fortran, dtype = _read_npy_header(fh)
            header_bytes = fh.tell()
        offset, data_bytes = 0, info.file_size - header_bytes
    if dtype.hasobject:
        raise QCError(f"array '{key}' holds Python objects; only numeric arrays are accepted", file=str(path))
    member = _Member(key, tuple(shape), fortran, dtype, info.compress_type == zipfile.ZIP_STORED, offset)
    if member.nbytes > data_bytes:
        raise QCError(f"array '{key}' declares shape {tuple(shape)} ({member.nbytes:,} bytes) but holds {data_bytes:,}: a truncated or altered file", file=str(path))
    return member


def _read_member(path: Path, archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    """Memory-map an uncompressed member; read a small compressed one into memory and inflate a
    large one into a temporary file, memory-mapped (the file is unlinked at once: the mapping
    keeps its pages, and nothing is left behind when the process ends)."""
    order = "F" if member.fortran else "C"
    if member.stored:
        return np.memmap(path, dtype=member.dtype, mode="r", offset=member.offset, shape=member.shape, order=order)
    with archive.open(member.key + ".npy") as fh:
        if member.nbytes <= INFLATE_TO_FILE_BYTES:
            return np.lib.format.read_array(fh, allow_pickle=False)
        _read_npy_header(fh)
        temporary = None
        try:
            descriptor, temporary = tempfile.mkstemp(prefix="qc-calib-", suffix=".bin")
            with os.fdopen(descriptor, "wb") as out:
                shutil.copyfileobj(fh, out, length=16 << 20)
            return np.memmap(temporary, dtype=member.dtype, mode="r", shape=member.shape, order=order)
        except OSError as exc:
            raise QCError(f"array '{member.key}' ({member.nbytes:,} bytes, compressed in the file) could not be inflated into {tempfile.gettempdir()}: {exc.strerror or exc}; "
                          "save it with numpy.savez (uncompressed) to have it memory-mapped in place", file=str(path)) from None
        finally:
            if temporary is not None:
                os.unlink(temporary)


def _check_finite(array: np.ndarray, name: str, path: Path, chunk: int = 1024) -> None:
    """A NaN or Inf in float data is an error naming the array and the first sample holding one."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    for start in range(0, len(array), chunk):  # in chunks: a memory-mapped file stays unread in bulk
        part = np.asarray(array[start : start + chunk])
        bad = ~np.isfinite(part.reshape(len(part), -1)).all(axis=1)
        if bad.any():
            index = start + int(np.flatnonzero(bad)[0])
            kind = "NaN" if np.isnan(part[index - start]).any() else "Inf"
            raise QCError(f"array '{name}' holds {kind} in sample {index} ({int(bad.sum())} bad sample(s) in this chunk of {len(part)}); calibration and verification need finite inputs", file=str(path))


class DataSource:
    """Named input arrays with a common first (sample) axis, and optional labels."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray | None = None, *, origin: str = "<arrays>") -> None:
        self.arrays = arrays
        self.labels = labels
        self.origin = origin
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise QCError(f"arrays have different numbers of samples: { {k: len(a) for k, a in arrays.items()} }", file=origin)
        self.num_samples = counts.pop()
        #: Batch size the model's inputs fix (None: any); see `for_inputs`.
        self.fixed_batch: int | None = None
        if labels is not None and len(labels) != self.num_samples:
            raise QCError(f"'labels' has {len(labels)} entries but the inputs have {self.num_samples} samples", file=origin)

    @classmethod
    def from_npz(cls, path: str | Path, inputs: list[InputSpec], *, count: int | None = None, count_option: str = "--calib-count") -> DataSource:
        """Open ``path`` and check it against the model's inputs (names, dtypes, shapes)."""
        path = Path(path)
        if not path.is_file():
            raise QCError("no such data file", file=str(path))
        try:
            archive = zipfile.ZipFile(path)
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            # Headers first: names, dtypes and shapes are checked before any array is read, and
            # only the arrays the model uses are read (a member it does not use costs nothing).
            members = {k: _member(path, archive, k) for k in keys}
        except QCError:
            raise
        except Exception as exc:
            raise QCError(f"not a readable .npz file ({type(exc).__name__}: {exc})", file=str(path)) from None
        label_member = members.pop(LABELS_KEY, None)
        chosen: dict[str, _Member] = {}
        if len(inputs) == 1 and len(members) == 1:
            chosen[inputs[0].name] = next(iter(members.values()))
        else:
            for spec in inputs:
                if spec.name not in members:
                    raise QCError(f"no array for model input '{spec.name}' (arrays in file: {', '.join(sorted(members)) or 'none'})", file=str(path))
                chosen[spec.name] = members[spec.name]
        for spec in inputs:
            _check_array(chosen[spec.name], spec, path)
        if label_member is not None and (len(label_member.shape) != 1 or not np.issubdtype(label_member.dtype, np.integer)):
            raise QCError(f"'labels' must be a 1-D integer array, got {label_member.dtype} {label_member.shape}", file=str(path))
        try:
            arrays = {name: _read_member(path, archive, m) for name, m in chosen.items()}
            labels = _read_member(path, archive, label_member) if label_member is not None else None
        except Exception as exc:
            raise QCError(f"not a readable .npz file ({type(exc).__name__}: {exc})", file=str(path)) from None
        if count is not None and count > 0:
            # Only the samples asked for are checked (and later read).
            arrays = {k: a[:count] for k, a in arrays.items()}
            labels = labels[:count] if labels is not None else None
        for name, array in arrays.items():
            _check_finite(array, chosen[name].key, path)
        source = cls(arrays, labels, origin=str(path))
        if count is not None:
            if count <= 0:
                raise QCError(f"sample count must be positive, got {count}", option=count_option)
            source = source.head(count)
        return source

    def head(self, count: int) -> DataSource:
        """The first ``count`` samples (all of them when there are fewer)."""
        count = min(count, self.num_samples)
        labels = None if self.labels is None else self.labels[:count]
        head = DataSource({k: a[:count] for k, a in self.arrays.items()}, labels, origin=self.origin)
        head.fixed_batch = self.fixed_batch
        return head

    def split(self, held_out: int) -> tuple[DataSource, DataSource]:
        """(the first samples, the last ``held_out``): calibrate on one, verify on the other.
        Each names its sample range in ``origin`` so a report says which samples it used."""
        cut = self.num_samples - held_out
        if not 0 < cut < self.num_samples:
            raise ValueError(f"cannot hold out {held_out} of {self.num_samples} samples")
        parts = []
        for lo, hi in ((0, cut), (cut, self.num_samples)):
            part = DataSource({k: a[lo:hi] for k, a in self.arrays.items()}, None if self.labels is None else self.labels[lo:hi], origin=f"{self.origin} samples {lo}-{hi - 1}")
            part.fixed_batch = self.fixed_batch
            parts.append(part)
        return parts[0], parts[1]

    def for_inputs(self, inputs: list[InputSpec]) -> DataSource:
        """This data, batched as the model's inputs require (a fixed batch dimension wins)."""
        sizes = {spec.shape[0] for spec in inputs if spec.shape and isinstance(spec.shape[0], int)}
        if len(sizes) > 1:
            raise QCError(f"the model's inputs have different fixed batch sizes {sorted(sizes)}", file=self.origin)
        fixed = sizes.pop() if sizes else None
        if fixed is not None and fixed > self.num_samples:
            raise QCError(f"the model takes batches of exactly {fixed} samples but the data has {self.num_samples}", file=self.origin)
        copy = DataSource(self.arrays, self.labels, origin=self.origin)
        copy.fixed_batch = fixed
        return copy

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches as contiguous in-memory arrays, in sample order.

        A model with a fixed batch dimension gets batches of exactly that size; the samples left
        over at the end (fewer than one batch) are not used.
        """
        step = self.fixed_batch or batch_size
        stop = self.num_samples - self.num_samples % step if self.fixed_batch else self.num_samples
        for start in range(0, stop, step):
            yield {k: np.ascontiguousarray(a[start : start + step]) for k, a in self.arrays.items()}

    @property
    def usable_samples(self) -> int:
        """Samples `batches` yields (all, unless a fixed batch size leaves a remainder)."""
        return self.num_samples - self.num_samples % self.fixed_batch if self.fixed_batch else self.num_samples

    def first_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return next(self.batches(batch_size))


def _check_array(array: np.ndarray | _Member, spec: InputSpec, path: Path) -> None:
    """An array (or its header) against a model input: dtype, samples, sample shape."""
    if array.dtype != spec.dtype:
        raise QCError(f"array for input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}", file=str(path))
    if len(array.shape) == 0 or array.shape[0] == 0:
        raise QCError(f"array for input '{spec.name}' has no samples (first axis = samples)", file=str(path))
    if spec.shape is None:
        return
    sample_shape = tuple(array.shape[1:])
    expected = spec.shape[1:]
    if len(sample_shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, sample_shape)):
        shown = tuple("?" if e is None else e for e in expected)
        raise QCError(f"array for input '{spec.name}' has sample shape {sample_shape}, the model expects {shown} (first axis = samples)", file=str(path))
