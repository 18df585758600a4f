"""`DataSource.from_npz`: reading, matching and checking calibration/verification data."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qcompiler.data import DataSource, InputSpec
from qcompiler.errors import QCError

IMAGE = InputSpec("input", np.dtype(np.float32), (None, 3, 4, 4))
MULTI = [InputSpec("a", np.dtype(np.float32), (None, 2)), InputSpec("b", np.dtype(np.int64), (None, 3))]

SAVERS = [pytest.param(np.savez_compressed, id="compressed"), pytest.param(np.savez, id="uncompressed")]


def images(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def multi_arrays(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"a": rng.standard_normal((n, 2)).astype(np.float32), "b": rng.integers(0, 100, (n, 3)).astype(np.int64)}


def data_error(path: Path, inputs: list[InputSpec], **kwargs) -> QCError:
    with pytest.raises(QCError) as info:
        DataSource.from_npz(path, inputs, **kwargs)
    exc = info.value
    assert "\n" not in str(exc), "an error must fit on one line"
    return exc


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", SAVERS)
@pytest.mark.parametrize("array_name", ["input", "x", "whatever_name"])
def test_single_array_of_any_name_for_single_input(tmp_path: Path, save, array_name: str) -> None:
    x = images()
    save(tmp_path / "d.npz", **{array_name: x})
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    assert list(source.arrays) == ["input"]
    assert source.num_samples == 10
    np.testing.assert_array_equal(source.arrays["input"], x)
    assert source.labels is None
    assert source.origin == str(tmp_path / "d.npz")


@pytest.mark.parametrize("save", SAVERS)
def test_single_input_picks_the_named_array_among_several(tmp_path: Path, save) -> None:
    x = images()
    save(tmp_path / "d.npz", input=x, other=np.zeros((3,), np.float32))
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    np.testing.assert_array_equal(source.arrays["input"], x)


@pytest.mark.parametrize("save", SAVERS)
def test_named_arrays_for_multi_input(tmp_path: Path, save) -> None:
    arrays = multi_arrays()
    save(tmp_path / "d.npz", **arrays, unused=np.zeros(4, np.float32))
    source = DataSource.from_npz(tmp_path / "d.npz", MULTI)
    assert set(source.arrays) == {"a", "b"}
    for name, expected in arrays.items():
        np.testing.assert_array_equal(source.arrays[name], expected)
        assert source.arrays[name].dtype == expected.dtype
    assert source.num_samples == 6


@pytest.mark.parametrize("save", SAVERS)
def test_labels_are_read(tmp_path: Path, save) -> None:
    labels = np.arange(10, dtype=np.int64) % 3
    save(tmp_path / "d.npz", input=images(), labels=labels)
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    assert list(source.arrays) == ["input"], "labels are not an input"
    np.testing.assert_array_equal(source.labels, labels)


def test_labels_with_a_differently_named_single_array(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "d.npz", pictures=images(4), labels=np.arange(4, dtype=np.int32))
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    assert source.num_samples == 4
    np.testing.assert_array_equal(source.labels, np.arange(4))


@pytest.mark.parametrize("save", SAVERS)
def test_count_limits_samples_and_labels(tmp_path: Path, save) -> None:
    x = images()
    labels = np.arange(10, dtype=np.int64)
    save(tmp_path / "d.npz", input=x, labels=labels)
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE], count=3)
    assert source.num_samples == 3
    np.testing.assert_array_equal(source.arrays["input"], x[:3])
    np.testing.assert_array_equal(source.labels, labels[:3])


def test_count_larger_than_the_file_takes_all(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "d.npz", input=images(5))
    assert DataSource.from_npz(tmp_path / "d.npz", [IMAGE], count=100).num_samples == 5


@pytest.mark.parametrize("count", [0, -1])
def test_count_not_positive(tmp_path: Path, count: int) -> None:
    np.savez_compressed(tmp_path / "d.npz", input=images(5))
    exc = data_error(tmp_path / "d.npz", [IMAGE], count=count)
    assert exc.option == "--calib-count"


def test_uncompressed_is_memory_mapped(tmp_path: Path) -> None:
    x = images(20)
    labels = np.arange(20, dtype=np.int64)
    np.savez(tmp_path / "d.npz", input=x, labels=labels)
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    assert isinstance(source.arrays["input"], np.memmap)
    np.testing.assert_array_equal(source.arrays["input"], x)
    np.testing.assert_array_equal(source.labels, labels)
    assert not source.arrays["input"].flags.writeable, "memory-mapped data must be read-only"


def test_uncompressed_memory_map_multi_input(tmp_path: Path) -> None:
    arrays = multi_arrays(7)
    np.savez(tmp_path / "d.npz", **arrays)
    source = DataSource.from_npz(tmp_path / "d.npz", MULTI)
    for name, expected in arrays.items():
        assert isinstance(source.arrays[name], np.memmap)
        np.testing.assert_array_equal(source.arrays[name], expected)


def test_uncompressed_fortran_order(tmp_path: Path) -> None:
    x = np.asfortranarray(images(6))
    np.savez(tmp_path / "d.npz", input=x)
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    np.testing.assert_array_equal(source.arrays["input"], x)


def test_uncompressed_file_written_by_zipfile_directly(tmp_path: Path) -> None:
    """A stored .npz made without numpy's writer (different local-header extras) reads the same."""
    import io

    x = images(3)
    buf = io.BytesIO()
    np.save(buf, x)
    with zipfile.ZipFile(tmp_path / "d.npz", "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("input.npy", buf.getvalue())
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    np.testing.assert_array_equal(source.arrays["input"], x)


def test_compressed_is_read_into_memory(tmp_path: Path) -> None:
    x = images()
    np.savez_compressed(tmp_path / "d.npz", input=x)
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    assert not isinstance(source.arrays["input"], np.memmap)
    np.testing.assert_array_equal(source.arrays["input"], x)


def test_large_compressed_array_is_inflated_to_a_memory_mapped_temporary_file(tmp_path: Path, monkeypatch) -> None:
    # savez_compressed of a big calibration set: inflated once to disk, never held whole in memory,
    # and the temporary file is gone at once (unlinked while mapped).
    import qcompiler.data as data_module

    x, labels = images(40), np.arange(40) % 3
    np.savez_compressed(tmp_path / "d.npz", input=x, labels=labels)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(data_module, "INFLATE_TO_FILE_BYTES", x.nbytes - 1)
    monkeypatch.setattr(data_module.tempfile, "tempdir", str(scratch))
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    assert isinstance(source.arrays["input"], np.memmap) and not isinstance(source.labels, np.memmap)
    np.testing.assert_array_equal(source.arrays["input"], x)
    np.testing.assert_array_equal(source.labels, labels)
    assert list(scratch.iterdir()) == []


def test_inflating_without_space_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    import qcompiler.data as data_module

    np.savez_compressed(tmp_path / "d.npz", input=images(40))
    monkeypatch.setattr(data_module, "INFLATE_TO_FILE_BYTES", 16)
    monkeypatch.setattr(data_module.tempfile, "tempdir", str(tmp_path / "no such folder"))
    exc = data_error(tmp_path / "d.npz", [IMAGE])
    assert "could not be inflated" in str(exc) and "numpy.savez" in str(exc)


def test_dynamic_dimensions_accept_any_size(tmp_path: Path) -> None:
    spec = InputSpec("input", np.dtype(np.float32), (None, 3, None, None))
    np.savez_compressed(tmp_path / "d.npz", input=np.zeros((2, 3, 7, 9), np.float32))
    assert DataSource.from_npz(tmp_path / "d.npz", [spec]).num_samples == 2


def test_unknown_shape_accepts_any_shape(tmp_path: Path) -> None:
    spec = InputSpec("input", np.dtype(np.float32), None)
    np.savez_compressed(tmp_path / "d.npz", input=np.zeros((2, 5), np.float32))
    assert DataSource.from_npz(tmp_path / "d.npz", [spec]).num_samples == 2


def test_input_spec_of_model() -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8]), helper.make_tensor_value_info("y", TensorProto.INT64, [2, 3, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    specs = InputSpec.of_model(ir.serde.deserialize_model(proto))
    assert specs == [InputSpec("x", np.dtype(np.float32), (None, 3, 8)), InputSpec("y", np.dtype(np.int64), (2, 3, 8))]


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", SAVERS)
def test_missing_input_lists_arrays_in_file(tmp_path: Path, save) -> None:
    path = tmp_path / "d.npz"
    save(path, a=multi_arrays()["a"], c=np.zeros((6, 3), np.int64))
    exc = data_error(path, MULTI)
    assert exc.file == str(path)
    assert "'b'" in exc.message
    assert "a, c" in exc.message, "the arrays present in the file should be listed"


def test_single_input_with_two_unnamed_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=images(), y=images())
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "input" in exc.message and "x, y" in exc.message


def test_empty_archive(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, labels=np.arange(3))
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "none" in exc.message


@pytest.mark.parametrize("save", SAVERS)
def test_wrong_dtype(tmp_path: Path, save) -> None:
    path = tmp_path / "d.npz"
    save(path, input=images().astype(np.float64))
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "float64" in exc.message and "float32" in exc.message and "input" in exc.message


@pytest.mark.parametrize("save", SAVERS)
@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (8, 3, 4), (8, 4, 4, 3), (8, 3, 4, 4, 1)])
def test_wrong_shape(tmp_path: Path, save, shape: tuple[int, ...]) -> None:
    path = tmp_path / "d.npz"
    save(path, input=np.zeros(shape, np.float32))
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert str(tuple(shape[1:])) in exc.message and "(3, 4, 4)" in exc.message


@pytest.mark.parametrize("save", SAVERS)
@pytest.mark.parametrize("array", [np.zeros((0, 3, 4, 4), np.float32), np.float32(1.0)], ids=["no-samples", "scalar"])
def test_no_samples(tmp_path: Path, save, array: np.ndarray) -> None:
    path = tmp_path / "d.npz"
    save(path, input=array)
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "samples" in exc.message


def test_inputs_with_different_sample_counts(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    arrays = multi_arrays(6)
    np.savez_compressed(path, a=arrays["a"], b=arrays["b"][:4])
    exc = data_error(path, MULTI)
    assert exc.file == str(path)


@pytest.mark.parametrize("save", SAVERS)
def test_labels_wrong_length(tmp_path: Path, save) -> None:
    path = tmp_path / "d.npz"
    save(path, input=images(10), labels=np.arange(7, dtype=np.int64))
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "labels" in exc.message and "7" in exc.message and "10" in exc.message


@pytest.mark.parametrize("save", SAVERS)
@pytest.mark.parametrize("labels", [np.zeros(10, np.float32), np.zeros((10, 1), np.int64), np.array(["cat"] * 10)], ids=["float", "2d", "str"])
def test_labels_not_integer_vector(tmp_path: Path, save, labels: np.ndarray) -> None:
    path = tmp_path / "d.npz"
    save(path, input=images(10), labels=labels)
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "labels" in exc.message


@pytest.mark.parametrize("save", SAVERS)
def test_object_arrays_refused(tmp_path: Path, save) -> None:
    path = tmp_path / "d.npz"
    save(path, input=np.array([object(), object()], dtype=object))
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)


def test_not_a_zip_file(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_text("hello, I am text")
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "npz" in exc.message


def test_plain_npy_file(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, images())
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)


def test_truncated_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, input=images(50))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    exc = data_error(path, [IMAGE])
    assert exc.file == str(path)
    assert "no such" in exc.message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    exc = data_error(tmp_path, [IMAGE])
    assert exc.file == str(tmp_path)


def test_file_is_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, input=images(), labels=np.arange(10))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    source = DataSource.from_npz(path, [IMAGE], count=4)
    list(source.batches(3))
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", SAVERS)
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 32])
def test_batches_cover_all_samples_in_order(tmp_path: Path, save, batch_size: int) -> None:
    x = images(10)
    save(tmp_path / "d.npz", input=x)
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    batches = list(source.batches(batch_size))
    sizes = [len(b["input"]) for b in batches]
    assert sum(sizes) == 10
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    for b in batches:
        assert type(b["input"]) is np.ndarray, "batches are plain in-memory arrays"
        assert b["input"].flags.c_contiguous
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x)


def test_batches_multi_input_stay_aligned(tmp_path: Path) -> None:
    arrays = multi_arrays(7)
    np.savez(tmp_path / "d.npz", **arrays)
    source = DataSource.from_npz(tmp_path / "d.npz", MULTI)
    batches = list(source.batches(3))
    assert [len(b["a"]) for b in batches] == [3, 3, 1]
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.concatenate([b[name] for b in batches]), arrays[name])


def test_batches_after_count(tmp_path: Path) -> None:
    x = images(10)
    np.savez_compressed(tmp_path / "d.npz", input=x)
    source = DataSource.from_npz(tmp_path / "d.npz", [IMAGE], count=5)
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in source.batches(2)]), x[:5])
    np.testing.assert_array_equal(source.first_batch(2)["input"], x[:2])


def test_head_and_constructor() -> None:
    x = images(6)
    source = DataSource({"input": x}, np.arange(6))
    head = source.head(4)
    assert head.num_samples == 4
    np.testing.assert_array_equal(head.labels, np.arange(4))
    with pytest.raises(QCError):
        DataSource({"input": x}, np.arange(5))


def test_fixed_batch_from_the_model_inputs() -> None:
    from qcompiler.data import InputSpec

    source = DataSource({"x": np.arange(10 * 2, dtype=np.float32).reshape(10, 2)})
    fixed = source.for_inputs([InputSpec("x", np.dtype(np.float32), (4, 2))])
    batches = list(fixed.batches(64))
    assert [len(b["x"]) for b in batches] == [4, 4] and fixed.usable_samples == 8
    assert len(fixed.first_batch(1)["x"]) == 4
    assert fixed.head(9).fixed_batch == 4
    dynamic = source.for_inputs([InputSpec("x", np.dtype(np.float32), (None, 2))])
    assert [len(b["x"]) for b in dynamic.batches(3)] == [3, 3, 3, 1]
    with pytest.raises(QCError, match="exactly 16"):
        source.for_inputs([InputSpec("x", np.dtype(np.float32), (16, 2))])


# --------------------------------------------------------------------------------------------
# untrusted files: headers before data, only what is used, finite values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", SAVERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_input_names_the_array_and_sample(tmp_path: Path, save, bad: float) -> None:
    x = images(12)
    x[7, 1, 2, 3] = bad
    save(tmp_path / "d.npz", input=x)
    exc = data_error(tmp_path / "d.npz", [IMAGE])
    assert "array 'input' holds" in str(exc) and "in sample 7" in str(exc) and ("NaN" in str(exc)) == np.isnan(bad)


def test_a_non_finite_sample_past_the_count_is_not_read(tmp_path: Path) -> None:
    x = images(12)
    x[9] = np.nan
    np.savez(tmp_path / "d.npz", input=x)
    assert DataSource.from_npz(tmp_path / "d.npz", [IMAGE], count=5).num_samples == 5


@pytest.mark.parametrize("save", SAVERS)
def test_only_the_arrays_the_model_uses_are_read(tmp_path: Path, save, monkeypatch: pytest.MonkeyPatch) -> None:
    import qcompiler.data as data

    save(tmp_path / "d.npz", input=images(), unused=np.zeros((4096, 1024), np.float32), labels=np.arange(10))
    read = []
    original = data._read_member
    monkeypatch.setattr(data, "_read_member", lambda path, archive, member: read.append(member.key) or original(path, archive, member))
    DataSource.from_npz(tmp_path / "d.npz", [IMAGE])
    assert sorted(read) == ["input", "labels"]


def test_a_wrong_shape_is_refused_from_the_header_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qcompiler.data as data

    np.savez_compressed(tmp_path / "d.npz", input=np.zeros((64, 3, 9, 9), np.float32))
    monkeypatch.setattr(data, "_read_member", lambda *a: pytest.fail("read before the shape was checked"))
    assert "sample shape (3, 9, 9)" in str(data_error(tmp_path / "d.npz", [IMAGE]))


def test_a_declared_shape_larger_than_the_data_is_refused(tmp_path: Path) -> None:
    """A header claiming more elements than the member holds (a hostile or truncated file)."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (1 << 20, 3, 4, 4)})
    buffer.write(np.zeros(16, np.float32).tobytes())
    with zipfile.ZipFile(tmp_path / "d.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", buffer.getvalue())
    exc = data_error(tmp_path / "d.npz", [IMAGE])
    assert "declares shape (1048576, 3, 4, 4)" in str(exc) and "truncated or altered" in str(exc)
