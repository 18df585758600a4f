"""Coded size of clustered weights, and the `.qcz` file that stores them Huffman-coded.

A clustered weight is ``Gather(codebook, Cast(indices))``, or ``DequantizeLinear(indices, step,
zero point)`` for centres on a uniform grid (see passes/cluster_weights.py). Its indices are coded
with one canonical Huffman code per codebook (or grid). A weight with pruned entries (the lookup
node's ``qc.codebook.zero_index`` metadata names the index holding them) is coded
sparsely instead: the indices of its non-zeros, plus the gaps (zero runs) between them, each with
its own Huffman code; a gap longer than `MAX_GAP` is split by an explicit zero entry, as in Deep
Compression.

`.qcz` layout: ``b"QCZ2"``, the SHA-256 of the rest, then the rest: an 8-byte header length, the
LZMA-compressed JSON header, the LZMA-compressed ONNX model without its index tensors (codebooks,
biases and everything else stay in it), and the coded streams the header points at. Unpacking
checks the digest first, so a truncated or altered file is refused before anything is decoded.
``b"QCZ1"`` files (JSON header as is, zlib-compressed model) still unpack: on ResNet-32 the header
and model took 31.5 kB of a 105.7 kB file in that layout, and LZMA makes them about 10 kB less.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qcompiler.codebook import ZERO_INDEX_KEY
from qcompiler.codebook.huffman import MAX_LENGTH, HuffmanCode
from qcompiler.errors import QCError
from qcompiler.ir import write_file_atomically

MAGIC = b"QCZ2"
#: The first layout, still read: a plain JSON header and a zlib-compressed model.
MAGIC_V1 = b"QCZ1"
#: Longest zero run coded as one gap symbol; longer runs get an explicit zero entry.
MAX_GAP = 255
#: Bits per codebook entry (float32).
CENTRE_BITS = 32


@dataclass
class ClusteredTensor:
    """One clustered weight in a saved model: where its indices and codebook live."""

    weight: str  # the original weight name (qc.source)
    indices: str  # initializer holding the indices
    codebook: str  # initializer holding the centres (Gather) or the grid step (DequantizeLinear)
    zero_index: int | None  # codebook slot of pruned weights, if any
    #: "gather": centres looked up by index; "grid": DequantizeLinear(index, step, zero point).
    lookup: str = "gather"


@dataclass
class CodedSize:
    """Bits of the coded weights, split by what they pay for."""

    weights: int = 0  # number of clustered weights
    index_bits: int = 0
    gap_bits: int = 0
    codebook_bits: int = 0
    table_bits: int = 0
    per_tensor: dict[str, int] = field(default_factory=dict)

    @property
    def total_bits(self) -> int:
        return self.index_bits + self.gap_bits + self.codebook_bits + self.table_bits

    @property
    def ratio(self) -> float:
        """32 x number of weights / coded bits (Choi et al.'s compression ratio)."""
        return 32 * self.weights / self.total_bits if self.total_bits else float("nan")


def clustered_tensors(model: onnx.ModelProto) -> list[ClusteredTensor]:
    """The clustered weights of a saved model, found from their Gather/Cast or DequantizeLinear
    pattern and metadata."""
    initializers = {t.name for t in model.graph.initializer}
    cast_input = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    found = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type not in ("Gather", "DequantizeLinear") or ZERO_INDEX_KEY not in meta:
            continue
        if node.op_type == "Gather":
            codebook, indices, lookup = node.input[0], cast_input.get(node.input[1], node.input[1]), "gather"
        else:
            codebook, indices, lookup = node.input[1], node.input[0], "grid"
        if codebook not in initializers or indices not in initializers:
            continue
        zero = meta[ZERO_INDEX_KEY]
        found.append(ClusteredTensor(meta.get("qc.source", indices), indices, codebook, int(zero) if zero else None, lookup))
    return found


def _sparse_streams(indices: np.ndarray, zero: int) -> tuple[np.ndarray, np.ndarray]:
    """(gap symbols, index symbols) of a pruned tensor: zeros before each coded entry, entry."""
    flat = indices.ravel()
    positions = np.flatnonzero(flat != zero)
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    # A run longer than MAX_GAP: every (MAX_GAP + 1)-th zero is coded as an explicit entry.
    fillers = gaps // (MAX_GAP + 1)
    entries = np.repeat(np.arange(len(positions)), fillers + 1)
    first_of_entry = np.concatenate([[0], np.cumsum(fillers + 1)[:-1]])
    within = np.arange(len(entries)) - first_of_entry[entries]
    is_real = within == fillers[entries]
    gap_symbols = np.where(is_real, gaps[entries] - fillers[entries] * (MAX_GAP + 1), MAX_GAP)
    index_symbols = np.where(is_real, flat[positions][entries], zero)
    return gap_symbols.astype(np.int64), index_symbols.astype(np.int64)


def _from_sparse(gaps: np.ndarray, entries: np.ndarray, size: int, zero: int, dtype: np.dtype) -> np.ndarray:
    out = np.full(size, zero, dtype=dtype)
    positions = np.cumsum(gaps + 1) - 1
    out[positions] = entries
    return out


def _groups(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, list[ClusteredTensor]]]:
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    groups: dict[str, list[ClusteredTensor]] = {}
    for t in clustered_tensors(model):
        groups.setdefault(t.codebook, []).append(t)
    return arrays, groups


def _group_codes(arrays: dict[str, np.ndarray], tensors: list[ClusteredTensor], alphabet: int) -> tuple[HuffmanCode, HuffmanCode | None, dict]:
    """One index code and one gap code per codebook, fitted on all its tensors' streams."""
    index_streams, gap_streams, streams = [], [], {}
    for t in tensors:
        idx = arrays[t.indices].astype(np.int64)
        if t.zero_index is not None:
            gaps, entries = _sparse_streams(idx, t.zero_index)
            gap_streams.append(gaps)
        else:
            gaps, entries = None, idx.ravel()
        index_streams.append(entries)
        streams[t.indices] = (gaps, entries)
    index_code = HuffmanCode.fit(np.concatenate(index_streams), alphabet)
    gap_code = HuffmanCode.fit(np.concatenate(gap_streams), MAX_GAP + 1) if gap_streams else None
    return index_code, gap_code, streams


def _coded_groups(arrays: dict[str, np.ndarray], groups: dict[str, list[ClusteredTensor]]) -> list[tuple]:
    """(codebook, tensors, index code, gap code, streams) per codebook: fitted once, then counted
    by `coded_size` or written by `pack`."""
    return [(codebook, tensors, *_group_codes(arrays, tensors, _alphabet(arrays, codebook, tensors))) for codebook, tensors in groups.items()]


def _alphabet(arrays: dict[str, np.ndarray], codebook: str, tensors: list[ClusteredTensor]) -> int:
    """Index symbols of a codebook: its centres, or the grid levels its tensors reach."""
    if tensors[0].lookup == "gather":
        return len(arrays[codebook])
    return int(max(arrays[t.indices].max() for t in tensors)) + 1


def _codebook_bits(arrays: dict[str, np.ndarray], codebook: str, tensors: list[ClusteredTensor]) -> int:
    """A float32 per centre; a grid is its float32 step and uint8 zero point."""
    return CENTRE_BITS * len(arrays[codebook]) if tensors[0].lookup == "gather" else CENTRE_BITS + 8


def _size_of(arrays: dict[str, np.ndarray], coded: list[tuple]) -> CodedSize:
    size = CodedSize()
    for codebook, tensors, index_code, gap_code, streams in coded:
        size.codebook_bits += _codebook_bits(arrays, codebook, tensors)
        size.table_bits += index_code.table_bits() + (gap_code.table_bits() if gap_code else 0)
        for t in tensors:
            gaps, entries = streams[t.indices]
            bits = index_code.coded_bits(entries)
            gap_bits = gap_code.coded_bits(gaps) if gaps is not None else 0
            size.index_bits += bits
            size.gap_bits += gap_bits
            size.weights += arrays[t.indices].size
            size.per_tensor[t.weight] = bits + gap_bits
    return size


def coded_size(model: onnx.ModelProto) -> CodedSize:
    """Exact bits of the Huffman-coded indices, gaps, codebooks and code tables."""
    arrays, groups = _groups(model)
    return _size_of(arrays, _coded_groups(arrays, groups))


def pack(model_path: str | os.PathLike, out_path: str | os.PathLike) -> CodedSize:
    """Write the `.qcz` of a clustered ONNX model (written to a temporary name, then renamed)."""
    model = onnx.load(str(model_path))
    arrays, groups = _groups(model)
    if not groups:
        raise QCError("no clustered weights to pack: compile with cluster-weights first", file=str(model_path))
    blobs: list[bytes] = []
    offset = 0

    def add(data: bytes) -> list[int]:
        nonlocal offset
        blobs.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    header: dict = {"version": 2, "codebooks": []}
    coded = set()
    groups_coded = _coded_groups(arrays, groups)
    for codebook, tensors, index_code, gap_code, streams in groups_coded:
        entry = {"codebook": codebook, "index_lengths": index_code.lengths.tolist(), "gap_lengths": gap_code.lengths.tolist() if gap_code else None, "tensors": []}
        for t in tensors:
            gaps, entries = streams[t.indices]
            data, bits = index_code.encode(entries)
            record = {"name": t.indices, "dtype": str(arrays[t.indices].dtype), "shape": list(arrays[t.indices].shape), "zero_index": t.zero_index,
                      "entries": len(entries), "index_bits": bits, "index_blob": add(data)}
            if gaps is not None:
                gdata, gbits = gap_code.encode(gaps)
                record.update(gap_bits=gbits, gap_blob=add(gdata))
            entry["tensors"].append(record)
            coded.add(t.indices)
        header["codebooks"].append(entry)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    kept = [t for t in skeleton.graph.initializer if t.name not in coded]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    serialized = skeleton.SerializeToString()
    header["skeleton_blob"] = add(_compress(serialized))
    header["skeleton_bytes"] = len(serialized)
    text = json.dumps(header, separators=(",", ":")).encode()
    header_bytes = struct.pack("<Q", len(text)) + _compress(text)
    payload = struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs)
    write_file_atomically(out_path, MAGIC + hashlib.sha256(payload).digest() + payload)
    return _size_of(arrays, groups_coded)


def unpack(qcz_path: str | os.PathLike) -> onnx.ModelProto:
    """The ONNX model a `.qcz` holds (index tensors decoded back to their exact values)."""
    path = str(qcz_path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise QCError(f"cannot read: {exc.strerror or exc}", file=path) from None
    if raw[:4] not in (MAGIC, MAGIC_V1):
        raise QCError("not a .qcz file (bad magic bytes)", file=path)
    version = 2 if raw[:4] == MAGIC else 1
    digest, payload = raw[4:36], raw[36:]
    if len(digest) < 32 or hashlib.sha256(payload).digest() != digest:
        raise QCError("checksum mismatch: the file is truncated or altered", file=path)
    # The digest only catches accidents (anyone can recompute it): everything below is checked
    # against hard limits and the file's own size before anything is allocated or inflated.
    if len(payload) < 8:
        raise QCError("truncated: no header length", file=path)
    (length,) = struct.unpack("<Q", payload[:8])
    if length > len(payload) - 8:
        raise QCError(f"corrupt header: its declared length {length} exceeds the file", file=path)
    try:
        header = json.loads(_header_text(payload[8 : 8 + length], version))
    except _Hostile as exc:
        raise QCError(f"corrupt header: {exc}", file=path) from None
    except (ValueError, lzma.LZMAError, struct.error):
        raise QCError("corrupt header", file=path) from None
    blobs = payload[8 + length :]
    try:
        _check_header(header, len(blobs), version)
    except _Hostile as exc:
        raise QCError(f"corrupt header: {exc}", file=path) from None

    def blob(where: list[int]) -> bytes:
        return blobs[where[0] : where[0] + where[1]]

    try:
        model = _decode(header, blob, version)
    except (ValueError, KeyError, TypeError, zlib.error, lzma.LZMAError, _Hostile) as exc:
        raise QCError(f"cannot decode: {exc}", file=path) from None
    except Exception as exc:  # protobuf's DecodeError and kin: the skeleton is no ONNX model
        raise QCError(f"cannot decode the model: {type(exc).__name__}", file=path) from None
    if not model.graph.node:
        raise QCError("holds an empty graph: nothing to unpack", file=path)
    return model


#: Hard limits on what a .qcz may declare (far above any model qc packs, far below what would
#: exhaust memory).
MAX_ELEMENTS = 1 << 31  # per index tensor
MAX_SKELETON_BYTES = (1 << 31) - 1  # protobuf's own limit
MAX_HEADER_BYTES = 256 << 20  # the JSON header, inflated
#: Files packed before the header recorded the model's size: inflate at most this much.
LEGACY_SKELETON_BYTES = 256 << 20
_INDEX_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "int64")


class _Hostile(ValueError):
    """A .qcz field outside what qc writes."""


def _span(where: object, size: int, what: str) -> None:
    if not (isinstance(where, list) and len(where) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in where)):
        raise _Hostile(f"{what} is not an [offset, length] pair")
    if where[0] + where[1] > size:
        raise _Hostile(f"{what} [{where[0]}, {where[1]}] lies past the end of the file's data ({size} bytes)")


def _lengths(values: object, what: str) -> None:
    if not isinstance(values, list) or len(values) > 1 << 20 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LENGTH for v in values):
        raise _Hostile(f"{what} must be a list of code lengths 0..{MAX_LENGTH}")


def _check_header(header: object, size: int, version: int) -> None:
    """Every count, length, shape, dtype and span of a .qcz header within limits and the file."""
    if not isinstance(header, dict) or header.get("version") != version or not isinstance(header.get("codebooks"), list):
        raise _Hostile(f"not a version {version} header")
    _span(header.get("skeleton_blob"), size, "the model's span")
    skeleton_bytes = header.get("skeleton_bytes", LEGACY_SKELETON_BYTES)
    if not isinstance(skeleton_bytes, int) or not 0 < skeleton_bytes <= MAX_SKELETON_BYTES:
        raise _Hostile("the model's size is out of range")
    for entry in header["codebooks"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), list):
            raise _Hostile("a codebook entry without tensors")
        _lengths(entry.get("index_lengths"), "index_lengths")
        if entry.get("gap_lengths") is not None:
            _lengths(entry["gap_lengths"], "gap_lengths")
        for record in entry["tensors"]:
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                raise _Hostile("a tensor record without a name")
            name = record["name"]
            if record.get("dtype") not in _INDEX_DTYPES:
                raise _Hostile(f"tensor '{name}': dtype {record.get('dtype')!r} is not an index type ({', '.join(_INDEX_DTYPES)})")
            shape = record.get("shape")
            if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise _Hostile(f"tensor '{name}': bad shape")
            elements = int(np.prod(shape, dtype=object)) if shape else 1
            if elements > MAX_ELEMENTS:
                raise _Hostile(f"tensor '{name}': {elements} elements is over the limit of {MAX_ELEMENTS}")
            entries, bits = record.get("entries"), record.get("index_bits")
            if not isinstance(entries, int) or not isinstance(bits, int) or not 0 <= entries <= elements or bits < 0:
                raise _Hostile(f"tensor '{name}': bad entry count or bit count")
            _span(record.get("index_blob"), size, f"tensor '{name}' indices")
            if bits > 8 * record["index_blob"][1] or bits > entries * MAX_LENGTH:
                raise _Hostile(f"tensor '{name}': {bits} index bits do not fit its data")
            zero = record.get("zero_index")
            if zero is not None:
                if not isinstance(zero, int) or entry.get("gap_lengths") is None:
                    raise _Hostile(f"tensor '{name}': a zero index without gaps")
                _span(record.get("gap_blob"), size, f"tensor '{name}' gaps")
                gap_bits = record.get("gap_bits")
                if not isinstance(gap_bits, int) or not 0 <= gap_bits <= 8 * record["gap_blob"][1]:
                    raise _Hostile(f"tensor '{name}': bad gap bit count")
            elif entries != elements:
                raise _Hostile(f"tensor '{name}': {entries} entries for {elements} elements")


def _compress(data: bytes) -> bytes:
    """LZMA at its strongest, without the xz container's own checksum (the file's digest covers it)."""
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=9 | lzma.PRESET_EXTREME)


def _inflate(data: bytes, limit: int, version: int, what: str = "the model") -> bytes:
    """Decompress at most ``limit`` bytes (zlib for version 1, LZMA after): a compression bomb
    stops there instead of filling memory."""
    if version == 1:
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, limit)
        if inflater.unconsumed_tail:
            raise _Hostile(f"{what} inflates past its declared {limit} bytes")
        if not inflater.eof:
            raise _Hostile(f"{what} is cut short")
        return out
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out = decompressor.decompress(data, max_length=limit)
    # Output of exactly ``limit`` bytes may stop short of the end marker: one more byte decides.
    if not decompressor.eof and len(out) == limit and decompressor.decompress(b"", max_length=1):
        raise _Hostile(f"{what} inflates past its declared {limit} bytes")
    if not decompressor.eof:
        raise _Hostile(f"{what} is cut short")
    return out


def _header_text(data: bytes, version: int) -> bytes:
    """The JSON text of a header: as stored (version 1), or its inflated size then LZMA."""
    if version == 1:
        return data
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES:
        raise _Hostile(f"its declared size {size} is over the limit of {MAX_HEADER_BYTES} bytes")
    return _inflate(data[8:], size, version, "the header")


def _decode(header: dict, blob, version: int) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(_inflate(blob(header["skeleton_blob"]), header.get("skeleton_bytes", LEGACY_SKELETON_BYTES), version))
    for entry in header["codebooks"]:
        index_code = HuffmanCode(np.asarray(entry["index_lengths"], dtype=np.int64))
        gap_code = HuffmanCode(np.asarray(entry["gap_lengths"], dtype=np.int64)) if entry["gap_lengths"] is not None else None
        for record in entry["tensors"]:
            dtype, shape = np.dtype(record["dtype"]), record["shape"]
            entries = index_code.decode(blob(record["index_blob"]), record["entries"], record["index_bits"])
            if record["zero_index"] is None:
                array = entries.astype(dtype).reshape(shape)
            else:
                gaps = gap_code.decode(blob(record["gap_blob"]), record["entries"], record["gap_bits"])
                size = int(np.prod(shape))
                if len(gaps) and int(np.sum(gaps + 1)) > size:
                    raise _Hostile(f"tensor '{record['name']}': its gaps run past its {size} elements")
                array = _from_sparse(gaps, entries, size, record["zero_index"], dtype).reshape(shape)
            model.graph.initializer.append(numpy_helper.from_array(array, record["name"]))
    return model
