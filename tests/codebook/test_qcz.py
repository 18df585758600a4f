"""qc pack / qc unpack: the round trip restores bit-identical outputs; the size counted is the
size written; truncated or altered files are refused with one line."""

from __future__ import annotations

import json
import lzma
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompiler.codebook.qcz import MAX_GAP, coded_size, pack, unpack
from qcompiler.errors import QCError
from qcompiler.ir import to_proto
from qcompiler.runtime import make_session
from tests.passes.test_cluster_weights import _data, _net, _run
from tests.test_cli_errors import assert_one_line_error, qc


def _clustered(tmp_path: Path, pipeline: str) -> Path:
    model, _ = _run(_net(np.random.default_rng(0)), pipeline)
    path = tmp_path / "clustered.onnx"
    onnx.save(to_proto(model), path)
    return path


PIPELINES = {
    "dense-network": "cluster-weights{method=kmeans,clusters=8}",
    "dense-layer": "cluster-weights{method=hessian-kmeans,clusters=5,scope=layer}",
    "pruned": "prune-magnitude{ratio=0.6},cluster-weights{method=kmeans,clusters=6}",
    # 99.5 % zeros: zero runs far longer than MAX_GAP need the explicit-zero entries.
    "long-runs": "prune-magnitude{ratio=0.995,scope=network},cluster-weights{method=kmeans,clusters=2}",
    "grid": "cluster-weights{method=uniform,target-bits=2.5,centres=grid}",
    "pruned-grid": "prune-magnitude{ratio=0.6},cluster-weights{method=uniform,clusters=9,centres=grid}",
}


@pytest.mark.parametrize("case", PIPELINES)
def test_round_trip_gives_bit_identical_outputs(tmp_path: Path, case: str) -> None:
    source = _clustered(tmp_path, PIPELINES[case])
    qcz = tmp_path / "m.qcz"
    size = pack(source, qcz)
    restored = unpack(qcz)
    original = onnx.load(source)
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name
    x = _data().arrays["x"]
    np.testing.assert_array_equal(make_session(original).run(None, {"x": x})[0], make_session(restored).run(None, {"x": x})[0])
    assert size.weights == sum(before[n].size for n in before if n.endswith("_indices"))
    if case == "long-runs":
        w2 = before["w2_indices"]
        assert np.max(np.diff(np.flatnonzero(w2.ravel() != 0), prepend=-1)) > MAX_GAP  # the case it is named for


def test_coded_size_is_what_the_file_holds(tmp_path: Path) -> None:
    source = _clustered(tmp_path, PIPELINES["pruned"])
    qcz = tmp_path / "m.qcz"
    size = pack(source, qcz)
    raw = qcz.read_bytes()[36:]
    (length,) = struct.unpack("<Q", raw[:8])
    (text_size,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(lzma.decompress(raw[16 : 8 + length]))
    assert len(json.dumps(header, separators=(",", ":"))) == text_size
    records = [r for entry in header["codebooks"] for r in entry["tensors"]]
    assert size.index_bits == sum(r["index_bits"] for r in records)
    assert size.gap_bits == sum(r.get("gap_bits", 0) for r in records) > 0
    stream_bytes = sum(r["index_blob"][1] + r.get("gap_blob", [0, 0])[1] for r in records)
    assert stream_bytes == sum((r["index_bits"] + 7) // 8 + (r.get("gap_bits", 0) + 7) // 8 for r in records)
    assert size == coded_size(onnx.load(source)) and size.ratio > 4


def test_a_version_1_file_still_unpacks(tmp_path: Path) -> None:
    """Files written before the LZMA layout (plain JSON header, zlib model) restore the same model."""
    import hashlib

    from qcompiler.codebook.qcz import MAGIC_V1

    source = _clustered(tmp_path, PIPELINES["pruned-grid"])
    pack(source, tmp_path / "v2.qcz")
    raw = (tmp_path / "v2.qcz").read_bytes()[36:]
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(lzma.decompress(raw[16 : 8 + length]))
    blobs = bytearray(raw[8 + length :])
    start, size = header["skeleton_blob"]
    skeleton = zlib.compress(lzma.decompress(bytes(blobs[start : start + size])), 9)
    header.update(version=1, skeleton_blob=[len(blobs), len(skeleton)])
    text = json.dumps(header).encode()
    payload = struct.pack("<Q", len(text)) + text + bytes(blobs) + skeleton
    (tmp_path / "v1.qcz").write_bytes(MAGIC_V1 + hashlib.sha256(payload).digest() + payload)
    assert unpack(tmp_path / "v1.qcz") == unpack(tmp_path / "v2.qcz")
    assert (tmp_path / "v2.qcz").stat().st_size < (tmp_path / "v1.qcz").stat().st_size


def test_altered_and_truncated_files_are_refused(tmp_path: Path) -> None:
    qcz = tmp_path / "m.qcz"
    pack(_clustered(tmp_path, PIPELINES["dense-network"]), qcz)
    raw = qcz.read_bytes()
    cases = {"truncated": raw[: len(raw) - 10], "altered": raw[:100] + bytes([raw[100] ^ 1]) + raw[101:], "short": raw[:20]}
    for name, data in cases.items():
        bad = tmp_path / f"{name}.qcz"
        bad.write_bytes(data)
        with pytest.raises(QCError, match="checksum"):
            unpack(bad)
    other = tmp_path / "model.onnx.qcz"
    other.write_bytes(b"\x08\x07" + raw[2:])
    with pytest.raises(QCError, match="magic"):
        unpack(other)


def test_cli_pack_unpack(tmp_path: Path) -> None:
    source = _clustered(tmp_path, PIPELINES["pruned"])
    result = qc("pack", source, "-o", "m.qcz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "x against float32 weights" in result.stdout.replace("\n", " ")
    assert_one_line_error(qc("pack", source, "-o", "m.qcz", cwd=tmp_path), "m.qcz", "--force")
    assert qc("unpack", "m.qcz", "-o", "back.onnx", cwd=tmp_path).returncode == 0
    x = _data().arrays["x"]
    np.testing.assert_array_equal(make_session(str(source)).run(None, {"x": x})[0], make_session(str(tmp_path / "back.onnx")).run(None, {"x": x})[0])
    (tmp_path / "cut.qcz").write_bytes((tmp_path / "m.qcz").read_bytes()[:-1])
    assert_one_line_error(qc("unpack", "cut.qcz", "-o", "cut.onnx", cwd=tmp_path), "cut.qcz", "checksum")
    assert not (tmp_path / "cut.onnx").exists() and not list(tmp_path.glob(".*tmp"))


def test_pack_of_a_model_without_clustered_weights(tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"
    onnx.save(to_proto(_net(np.random.default_rng(0))), plain)
    assert_one_line_error(qc("pack", plain, "-o", "m.qcz", cwd=tmp_path), "plain.onnx", "cluster-weights")
    assert not (tmp_path / "m.qcz").exists()


# --- hostile files: a valid digest (anyone can compute one) over crafted contents ---------------

def _craft(tmp_path, payload: bytes, version: int = 2):
    import hashlib

    from qcompiler.codebook.qcz import MAGIC, MAGIC_V1

    path = tmp_path / "crafted.qcz"
    path.write_bytes((MAGIC if version == 2 else MAGIC_V1) + hashlib.sha256(payload).digest() + payload)
    return path


def _compress(data: bytes, version: int) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE) if version == 2 else zlib.compress(data, 9)


def _with_header(header: dict, blobs: bytes = b"", version: int = 2, declared: int | None = None) -> bytes:
    text = json.dumps({**header, "version": version}).encode()
    if version == 2:
        text = struct.pack("<Q", len(text) if declared is None else declared) + _compress(text, 2)
    return struct.pack("<Q", len(text)) + text + blobs


def _skeleton(graph_nodes: int = 1, version: int = 2) -> tuple[bytes, int]:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", ["x"], ["y"])][:graph_nodes]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    raw = model.SerializeToString()
    return _compress(raw, version), len(raw)


def _record(**changes) -> dict:
    record = {"name": "w", "dtype": "uint8", "shape": [4], "zero_index": None, "entries": 4, "index_bits": 4, "index_blob": [0, 1]}
    record.update(changes)
    return record


@pytest.mark.parametrize(("case", "message"), [
    ("short", "truncated: no header length"),
    ("long-header", "exceeds the file"),
    ("not-onnx", "cannot decode the model"),
    ("object-dtype", "dtype 'O' is not an index type"),
    ("huge-shape", "elements is over the limit"),
    ("long-codes", "code lengths 0..16"),
    ("past-end", "lies past the end of the file's data"),
    ("bomb", "inflates past its declared 1000 bytes"),
    ("empty-graph", "holds an empty graph"),
    ("cut-model", "cut short|cannot decode"),
    ("header-bomb", "header: the header inflates past its declared 10 bytes"),
    ("huge-header", "header: its declared size .* is over the limit"),
    ("junk-header", "corrupt header"),
    ("wrong-version", "not a version"),
])
@pytest.mark.parametrize("version", [1, 2])
def test_a_crafted_file_is_one_clear_error_never_a_crash_or_a_bomb(tmp_path, case: str, message: str, version: int) -> None:
    if version == 1 and case in ("header-bomb", "huge-header"):
        pytest.skip("a version 1 header is stored as is")
    skeleton, size = _skeleton(version=version)
    blobs = b"\x00" + skeleton
    header = {"codebooks": [{"codebook": "c", "index_lengths": [1, 1], "gap_lengths": None, "tensors": [_record()]}],
              "skeleton_blob": [1, len(skeleton)], "skeleton_bytes": size}

    if case == "short":
        payload = b"\x01\x02"
    elif case == "long-header":
        payload = (10**9).to_bytes(8, "little") + b"{}"
    elif case == "not-onnx":
        junk = _compress(b"\xff" * 64, version)
        header.update(skeleton_blob=[1, len(junk)], skeleton_bytes=64)
        payload = _with_header(header, b"\x00" + junk, version)
    elif case == "object-dtype":
        header["codebooks"][0]["tensors"] = [_record(dtype="O")]
        payload = _with_header(header, blobs, version)
    elif case == "huge-shape":
        header["codebooks"][0]["tensors"] = [_record(shape=[1 << 20, 1 << 20], entries=4)]
        payload = _with_header(header, blobs, version)
    elif case == "long-codes":
        header["codebooks"][0]["index_lengths"] = [40, 40]
        payload = _with_header(header, blobs, version)
    elif case == "past-end":
        header["codebooks"][0]["tensors"] = [_record(index_blob=[0, 10**6])]
        payload = _with_header(header, blobs, version)
    elif case == "bomb":
        bomb = _compress(b"\x00" * (10 << 20), version)
        header.update(skeleton_blob=[1, len(bomb)], skeleton_bytes=1000)
        payload = _with_header(header, b"\x00" + bomb, version)
    elif case == "cut-model":
        header.update(skeleton_blob=[1, len(skeleton) - 4])
        payload = _with_header(header, blobs, version)
    elif case == "header-bomb":
        payload = _with_header(header, blobs, version, declared=10)
    elif case == "huge-header":
        payload = _with_header(header, blobs, version, declared=1 << 40)
    elif case == "junk-header":
        junk = (struct.pack("<Q", 100) + b"\xfd7zXZ junk") if version == 2 else b"{not json"
        payload = struct.pack("<Q", len(junk)) + junk + blobs
    elif case == "wrong-version":
        text = json.dumps({**header, "version": 3 - version}).encode()
        if version == 2:
            text = struct.pack("<Q", len(text)) + _compress(text, 2)
        payload = struct.pack("<Q", len(text)) + text + blobs
    else:  # empty-graph
        empty, empty_size = _skeleton(graph_nodes=0, version=version)
        header.update(codebooks=[], skeleton_blob=[0, len(empty)], skeleton_bytes=empty_size)
        payload = _with_header(header, empty, version)
    with pytest.raises(QCError, match=message):
        unpack(_craft(tmp_path, payload, version))
