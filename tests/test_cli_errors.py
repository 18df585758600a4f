"""Every bad input to the ``qc`` command line gets one clear line, exit status 2, no traceback,
no partial output, and an untouched input model.

Each test runs the real CLI in a subprocess (``python -m qcompiler.cli``) with ``--no-verify`` or
``--latency-runs 0`` and ``--calib-count 16`` so it takes a second or two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = ROOT / "models" / "cifar10_resnet20.onnx"
BUNDLED_CALIB = ROOT / "models" / "cifar10_calib.npz"
FAST = ("--no-verify", "--calib-count", "16")

pytestmark = pytest.mark.skipif(not BUNDLED_MODEL.exists() or not BUNDLED_CALIB.exists(), reason="bundled model or calibration data missing")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def qc(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``qc ARGS`` the way a user does, in ``cwd``."""
    env = dict(os.environ)
    for var in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(var, None)
    env["NO_COLOR"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        [sys.executable, "-m", "qcompiler.cli", *(str(a) for a in args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(path: Path) -> tuple[bytes, int]:
    """Bytes and modification time of a file, to prove it was not touched."""
    return path.read_bytes(), path.stat().st_mtime_ns


def tree(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path`` with its bytes and mtime."""
    return {str(p.relative_to(path)): snapshot(p) for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Temporary or backup folders the atomic writer may have left beside ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *culprits: str, code: int = 2) -> str:
    """Non-zero exit (``code``), exactly one non-empty stderr line, no traceback, names the culprits."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode != 0, f"exit 0 for a bad input\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\nstderr:\n{proc.stderr}"
    text = proc.stderr.strip()
    assert text, f"nothing on stderr (stdout: {proc.stdout!r})"
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in: {line}"
    return line


def compile_error(tmp_path: Path, model: Path, *args: object, culprits: tuple[str, ...], calib: Path | None = BUNDLED_CALIB) -> str:
    """``qc compile`` that must fail: one line, no output folder, input model untouched."""
    out = tmp_path / "out"
    before = snapshot(model) if model.is_file() else None
    calib_args = ("--calib", calib) if calib is not None else ()
    proc = qc("compile", model, *calib_args, "-o", out, *args, cwd=tmp_path)
    line = assert_one_line_error(proc, *culprits)
    assert not out.exists(), f"partial output left in {out}: {list(out.iterdir()) if out.is_dir() else 'a file'}"
    assert leftovers(out) == []
    if before is not None:
        assert snapshot(model) == before, "the input model was modified"
    elif not model.is_dir():
        assert not model.exists(), "a missing input model was created"
    return line


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A private copy of the bundled model (its bytes and mtime are checked after each run)."""
    target = tmp_path / "models" / "resnet20.onnx"
    target.parent.mkdir()
    shutil.copy2(BUNDLED_MODEL, target)
    return target


def save_npz(path: Path, compressed: bool = True, **arrays: np.ndarray) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def tiny_model(path: Path, middle: str) -> Path:
    """Conv -> MIDDLE -> Conv on [N,3,8,8] inputs; MIDDLE is an op ort-cpu does not quantize."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), "w2"),
    ]
    extra = {"axis": 1} if middle == "Softmax" else {}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(middle, ["c1"], ["m"], name="odd_op", **extra),
        helper.make_node("Conv", ["m", "w2"], ["output"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 8, 8])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


PLUGIN = '''
from qcompiler.errors import QCError
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.registry import register_pass


@register_pass
class Explode(Pass):
    """Fail on purpose with a user-facing error naming a node."""

    name = "test-explode"

    def run(self, model, ctx):
        node = next(iter(model.graph))
        raise QCError("refused on purpose", pass_name=self.name, node=node.name)


@register_pass
class Crash(Pass):
    """Crash on purpose (a bug in a pass, not a user error)."""

    name = "test-crash"

    def run(self, model, ctx):
        raise RuntimeError("boom")
'''


# --------------------------------------------------------------------------------------------
# the CLI entry point itself
# --------------------------------------------------------------------------------------------


def test_module_entry_point_runs(tmp_path: Path) -> None:
    proc = qc("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "compile" in proc.stdout


# --------------------------------------------------------------------------------------------
# 1-3: bad model files
# --------------------------------------------------------------------------------------------


def test_model_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a protobuf\n")
    compile_error(tmp_path, bad, *FAST, culprits=(str(bad),))


def test_model_truncated(tmp_path: Path) -> None:
    data = BUNDLED_MODEL.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    line = compile_error(tmp_path, bad, *FAST, culprits=(str(bad),))
    assert "onnx" in line.lower()


def test_model_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    line = compile_error(tmp_path, missing, *FAST, culprits=(str(missing),))
    assert "no such" in line.lower() or "not found" in line.lower() or "does not exist" in line.lower()


def test_model_is_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "model_dir.onnx"
    folder.mkdir()
    compile_error(tmp_path, folder, *FAST, culprits=(str(folder),))


def test_bundled_model_untouched_by_failing_compile(tmp_path: Path) -> None:
    """The shared bundled model itself (not a copy) is never written to, even on failure."""
    compile_error(tmp_path, BUNDLED_MODEL, "--pipeline", "fold-batchnorm,bogus-pass", *FAST, culprits=("bogus-pass",))


# --------------------------------------------------------------------------------------------
# 4-8: target and pipeline
# --------------------------------------------------------------------------------------------


def test_unknown_target(tmp_path: Path, model: Path) -> None:
    line = compile_error(tmp_path, model, "--target", "nope", *FAST, culprits=("nope", "--target"))
    assert "ort-cpu" in line, "the line should list the built-in targets"


def test_missing_target_file(tmp_path: Path, model: Path) -> None:
    missing = tmp_path / "mine.toml"
    compile_error(tmp_path, model, "--target", missing, *FAST, culprits=(str(missing),))


def test_unknown_pass_in_pipeline(tmp_path: Path, model: Path) -> None:
    line = compile_error(tmp_path, model, "--pipeline", "fold-batchnorm,bogus-pass", *FAST, culprits=("bogus-pass",))
    assert "fold-batchnorm" in line and "insert-qdq" in line, "the line should list the known passes"


def test_unknown_pass_option(tmp_path: Path, model: Path) -> None:
    line = compile_error(tmp_path, model, "--pipeline", "calibrate{methd=mse}", *FAST, culprits=("calibrate", "methd"))
    for accepted in ("method", "percentile"):
        assert accepted in line


def test_bad_literal_option_value_lists_choices(tmp_path: Path, model: Path) -> None:
    line = compile_error(tmp_path, model, "--pipeline", "calibrate{method=foo}", *FAST, culprits=("calibrate", "method", "foo"))
    for choice in ("minmax", "percentile", "entropy", "mse"):
        assert choice in line, f"accepted value {choice} not listed"


def test_bad_float_option_value(tmp_path: Path, model: Path) -> None:
    compile_error(tmp_path, model, "--pipeline", "calibrate{percentile=abc}", *FAST, culprits=("calibrate", "percentile", "abc"))


def test_out_of_range_option_value(tmp_path: Path, model: Path) -> None:
    compile_error(tmp_path, model, "--pipeline", "calibrate{percentile=10}", *FAST, culprits=("calibrate", "percentile"))


def test_pipeline_syntax_error(tmp_path: Path, model: Path) -> None:
    line = compile_error(tmp_path, model, "--pipeline", "calibrate{method=mse", *FAST, culprits=("--pipeline",))
    assert "calibrate" in line and "{" in line


def test_print_after_unknown_pass(tmp_path: Path, model: Path) -> None:
    compile_error(tmp_path, model, "--print-after", "bogus", *FAST, culprits=("bogus", "--print-after"))


def test_missing_calibration_option(tmp_path: Path, model: Path) -> None:
    compile_error(tmp_path, model, *FAST, culprits=("--calib",), calib=None)


# --------------------------------------------------------------------------------------------
# 9-11, 15: calibration data
# --------------------------------------------------------------------------------------------


def test_npz_missing_the_input(tmp_path: Path, model: Path) -> None:
    samples = np.zeros((4, 3, 32, 32), np.float32)
    npz = save_npz(tmp_path / "calib.npz", x=samples, y=samples)
    line = compile_error(tmp_path, model, *FAST, culprits=(str(npz), "input"), calib=npz)
    assert "x" in line and "y" in line, "the line should list the arrays found in the file"


def test_npz_wrong_sample_shape(tmp_path: Path, model: Path) -> None:
    npz = save_npz(tmp_path / "calib.npz", input=np.zeros((8, 3, 16, 16), np.float32))
    line = compile_error(tmp_path, model, *FAST, culprits=(str(npz), "input"), calib=npz)
    assert "16" in line and "32" in line


def test_npz_wrong_dtype(tmp_path: Path, model: Path) -> None:
    npz = save_npz(tmp_path / "calib.npz", input=np.zeros((8, 3, 32, 32), np.float64))
    line = compile_error(tmp_path, model, *FAST, culprits=(str(npz), "input"), calib=npz)
    assert "float64" in line and "float32" in line


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "uncompressed"])
def test_npz_wrong_shape_either_storage(tmp_path: Path, model: Path, compressed: bool) -> None:
    """Uncompressed files take the memory-mapping path; the check must be the same."""
    npz = save_npz(tmp_path / "calib.npz", compressed, input=np.zeros((8, 3, 16, 16), np.float32))
    compile_error(tmp_path, model, *FAST, culprits=(str(npz), "input", "(3, 16, 16)"), calib=npz)


def test_npz_not_a_zip(tmp_path: Path, model: Path) -> None:
    npz = tmp_path / "calib.npz"
    npz.write_text("not an archive")
    compile_error(tmp_path, model, *FAST, culprits=(str(npz),), calib=npz)


def test_npz_missing(tmp_path: Path, model: Path) -> None:
    npz = tmp_path / "nope.npz"
    compile_error(tmp_path, model, *FAST, culprits=(str(npz),), calib=npz)


def test_verify_data_wrong_shape(tmp_path: Path, model: Path) -> None:
    npz = save_npz(tmp_path / "check.npz", input=np.zeros((8, 3, 16, 16), np.float32))
    compile_error(tmp_path, model, "--data", npz, "--latency-runs", "0", "--calib-count", "16", culprits=(str(npz),))


@pytest.mark.parametrize("count", ["0", "-3"])
def test_calib_count_not_positive(tmp_path: Path, model: Path, count: str) -> None:
    compile_error(tmp_path, model, "--no-verify", "--calib-count", count, culprits=("--calib-count",))


def test_uncompressed_calibration_file_works(tmp_path: Path, model: Path) -> None:
    """np.savez (memory-mapped on read) is as good as np.savez_compressed."""
    with np.load(BUNDLED_CALIB) as data:
        npz = save_npz(tmp_path / "calib.npz", False, input=data["input"][:16], labels=data["labels"][:16])
    out = tmp_path / "out"
    proc = qc("compile", model, "--calib", npz, "-o", out, "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.onnx").is_file()


# --------------------------------------------------------------------------------------------
# 12: output folder
# --------------------------------------------------------------------------------------------


def test_nonempty_output_refused_without_force_then_replaced_with_force(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("precious")
    before_tree = tree(out)
    before_model = snapshot(model)

    proc = qc("compile", model, "--calib", BUNDLED_CALIB, "-o", out, *FAST, cwd=tmp_path)
    assert_one_line_error(proc, str(out), "--force")
    assert tree(out) == before_tree, "the existing output folder was changed"
    assert leftovers(out) == []
    assert snapshot(model) == before_model

    proc = qc("compile", model, "--calib", BUNDLED_CALIB, "-o", out, "--force", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()
    assert not keep.exists(), "--force replaces the folder"
    assert leftovers(out) == []
    assert snapshot(model) == before_model
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)


def test_output_path_is_a_file(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    before = snapshot(out)
    proc = qc("compile", model, "--calib", BUNDLED_CALIB, "-o", out, "--force", *FAST, cwd=tmp_path)
    assert_one_line_error(proc, str(out))
    assert snapshot(out) == before


def test_empty_output_folder_is_fine_without_force(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = qc("compile", model, "--calib", BUNDLED_CALIB, "-o", out, *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]


def test_pass_error_leaves_no_partial_output(tmp_path: Path, model: Path) -> None:
    """A pass failing inside the atomic output step: one line naming pass and node, old output kept."""
    plugin = tmp_path / "explode_plugin.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("previous result")
    before_tree = tree(out)
    before_model = snapshot(model)
    proc = qc("compile", model, "--calib", BUNDLED_CALIB, "-o", out, "--force", "--plugin", plugin,
              "--pipeline", "infer-shapes,test-explode", *FAST, cwd=tmp_path)
    assert_one_line_error(proc, "test-explode", "node '")
    assert tree(out) == before_tree
    assert leftovers(out) == []
    assert snapshot(model) == before_model


def test_pass_crash_leaves_no_partial_output(tmp_path: Path, model: Path) -> None:
    """Even a crash (a bug in a pass) must not leave a half-written folder or touch the old one."""
    plugin = tmp_path / "crash_plugin.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("previous result")
    before_tree = tree(out)
    before_model = snapshot(model)
    proc = qc("compile", model, "--calib", BUNDLED_CALIB, "-o", out, "--force", "--plugin", plugin,
              "--pipeline", "infer-shapes,test-crash", *FAST, cwd=tmp_path)
    assert proc.returncode != 0
    assert tree(out) == before_tree
    assert leftovers(out) == []
    assert snapshot(model) == before_model


def test_missing_plugin_file(tmp_path: Path, model: Path) -> None:
    plugin = tmp_path / "nope.py"
    compile_error(tmp_path, model, "--plugin", plugin, *FAST, culprits=(str(plugin),))


# --------------------------------------------------------------------------------------------
# 13: an op the target cannot quantize stays float and is reported
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("middle", ["Sin", "Softmax"])
def test_unquantizable_op_kept_float(tmp_path: Path, middle: str) -> None:
    import onnxruntime as ort

    model_path = tiny_model(tmp_path / "tiny.onnx", middle)
    samples = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    npz = save_npz(tmp_path / "tiny.npz", input=samples)
    before = snapshot(model_path)
    out = tmp_path / "out"

    proc = qc("compile", model_path, "--calib", npz, "-o", out, "--latency-runs", "0", "--calib-count", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(model_path) == before

    report = json.loads((out / "report.json").read_text())
    kept = {k["node"]: k for k in report["kept_float"]}
    assert "odd_op" in kept, report["kept_float"]
    assert kept["odd_op"]["op_type"] == middle
    assert kept["odd_op"]["reason"].strip(), "kept_float needs a reason"
    assert "conv1" not in kept and "conv2" not in kept

    quant = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(quant, full_check=True)
    ops = [n.op_type for n in quant.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert ops.count(middle) == 1
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"input": samples[:4]})
    assert result.shape == (4, 2, 8, 8)
    assert np.isfinite(result).all()


# --------------------------------------------------------------------------------------------
# 14: qc verify
# --------------------------------------------------------------------------------------------


def test_verify_with_non_onnx_quantized_file(tmp_path: Path, model: Path) -> None:
    bad = tmp_path / "quant.onnx"
    bad.write_text("not a model")
    before = snapshot(model)
    report = tmp_path / "report.json"
    proc = qc("verify", model, bad, "--data", BUNDLED_CALIB, "--count", "8", "--latency-runs", "0", "--json", report, cwd=tmp_path)
    assert_one_line_error(proc, str(bad))
    assert snapshot(model) == before
    assert not report.exists()


def test_verify_with_missing_data(tmp_path: Path, model: Path) -> None:
    npz = tmp_path / "nope.npz"
    proc = qc("verify", model, model, "--data", npz, "--latency-runs", "0", cwd=tmp_path)
    assert_one_line_error(proc, str(npz))


# --------------------------------------------------------------------------------------------
# target files through the CLI
# --------------------------------------------------------------------------------------------


def test_target_file_unknown_key(tmp_path: Path, model: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text('extends = "ort-cpu"\n[weights]\ncolour = "blue"\n')
    compile_error(tmp_path, model, "--target", target, *FAST, culprits=(f"{target}:weights.colour",))


def test_target_file_unknown_top_level_key(tmp_path: Path, model: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text('extends = "ort-cpu"\nbogus = 1\n')
    compile_error(tmp_path, model, "--target", target, *FAST, culprits=(f"{target}:bogus",))


def test_target_file_with_overrides_compiles(tmp_path: Path, model: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text('extends = "ort-cpu"\nname = "mine"\n[activations]\ndtype = "int8"\nsymmetric = true\n')
    out = tmp_path / "out"
    proc = qc("compile", model, "--target", target, "--calib", BUNDLED_CALIB, "-o", out, *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "mine"
    quant = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in quant.graph.initializer}
    activation_zps = [inits[n.input[2]] for n in quant.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert activation_zps, "no QuantizeLinear with a constant zero point"
    for zp in activation_zps:
        assert zp.data_type == TensorProto.INT8, "activations.dtype = int8 override not applied"
        assert not numpy_helper.to_array(zp).any(), "activations.symmetric = true needs zero point 0"


# --------------------------------------------------------------------------------------------
# command-line usage errors (parsed by typer/click) and option paths
# --------------------------------------------------------------------------------------------

CLICK_BUG = (
    "BUG: qcompiler/cli.py main(): the fallback handler does `import click`, but typer 0.29 vendors "
    "click as typer._click and click is not installed, so every usage error (unknown flag, missing "
    "argument, non-integer value, unknown command) ends in a ModuleNotFoundError traceback with exit 1 "
    "instead of click's one-line usage error with exit 2"
)


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (("--bogus-flag",), "--bogus-flag"),
        (("--seed", "abc"), "--seed"),
        (("--calib-count", "many"), "--calib-count"),
        (("--latency-runs", "1.5"), "--latency-runs"),
    ],
    ids=["unknown-flag", "bad-int-seed", "bad-int-calib-count", "bad-int-latency-runs"],
)
def test_cli_usage_error(tmp_path: Path, model: Path, args: tuple[str, ...], culprit: str) -> None:
    compile_error(tmp_path, model, "--no-verify", *args, culprits=(culprit,))


def test_cli_missing_model_argument(tmp_path: Path) -> None:
    proc = qc("compile", "--calib", BUNDLED_CALIB, cwd=tmp_path)
    assert_one_line_error(proc, "model")


def test_cli_unknown_command(tmp_path: Path) -> None:
    proc = qc("compyle", cwd=tmp_path)
    assert_one_line_error(proc, "compyle")


def test_cli_without_arguments_shows_help(tmp_path: Path) -> None:
    proc = qc(cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert "compile" in proc.stdout + proc.stderr


def test_dump_dir_is_a_file(tmp_path: Path, model: Path) -> None:
    dump = tmp_path / "dump"
    dump.write_text("a file")
    line = compile_error(tmp_path, model, "--dump-dir", dump, *FAST, culprits=(str(dump),))
    assert "--dump-dir" in line or "folder" in line or "directory" in line
    assert dump.read_text() == "a file"


def test_dump_dir_inside_the_output_folder_is_refused(tmp_path: Path, model: Path) -> None:
    # The output folder is moved in place when the compile ends, which would delete the dumps.
    dump = tmp_path / "out" / "passes"
    line = compile_error(tmp_path, model, "--dump-dir", dump, *FAST, culprits=(str(dump),))
    assert "--dump-dir" in line and "output folder" in line


def test_dump_dir_not_created_when_input_is_bad(tmp_path: Path) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    dump = tmp_path / "dump"
    compile_error(tmp_path, bad, "--dump-dir", dump, *FAST, culprits=(str(bad),))
    assert not dump.exists(), "--dump-dir folder created by a compile that failed on its input"


def test_verify_json_in_missing_folder(tmp_path: Path, model: Path) -> None:
    report = tmp_path / "nowhere" / "report.json"
    proc = qc("verify", model, model, "--data", BUNDLED_CALIB, "--count", "4", "--latency-runs", "0", "--json", report, cwd=tmp_path)
    if proc.returncode == 0:  # creating the folder is an acceptable answer too
        assert json.loads(report.read_text())
    else:
        assert_one_line_error(proc, str(report))
        assert not report.parent.exists() or not any(report.parent.iterdir())


def test_verify_count_zero_names_count(tmp_path: Path, model: Path) -> None:
    proc = qc("verify", model, model, "--data", BUNDLED_CALIB, "--count", "0", "--latency-runs", "0", cwd=tmp_path)
    line = assert_one_line_error(proc, "--count")
    assert "--calib-count" not in line


def test_verify_count_zero_is_refused(tmp_path: Path, model: Path) -> None:
    proc = qc("verify", model, model, "--data", BUNDLED_CALIB, "--count", "0", "--latency-runs", "0", cwd=tmp_path)
    assert_one_line_error(proc, "count")


# --------------------------------------------------------------------------------------------
# models that are ONNX but wrong
# --------------------------------------------------------------------------------------------


def dangling_model(path: Path) -> Path:
    """A node reads a tensor nothing produces (fails the ONNX checker)."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "missing_weight"], ["output"], name="conv_bad")],
        "dangling",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return path


def test_invalid_graph_is_refused(tmp_path: Path) -> None:
    bad = dangling_model(tmp_path / "dangling.onnx")
    npz = save_npz(tmp_path / "d.npz", input=np.zeros((4, 3, 8, 8), np.float32))
    proc = qc("compile", bad, "--calib", npz, "-o", tmp_path / "out", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_graph_gets_one_line_naming_file_or_node(tmp_path: Path) -> None:
    bad = dangling_model(tmp_path / "dangling.onnx")
    npz = save_npz(tmp_path / "d.npz", input=np.zeros((4, 3, 8, 8), np.float32))
    proc = qc("compile", bad, "--calib", npz, "-o", tmp_path / "out", "--no-verify", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert str(bad) in line or "conv_bad" in line


def old_opset_model(path: Path, opset: int) -> Path:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["output"], name="relu"),
        ],
        "old",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 7
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def test_old_opset_model_fails_cleanly_or_compiles(tmp_path: Path) -> None:
    model_path = old_opset_model(tmp_path / "old.onnx", 11)
    npz = save_npz(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    proc = qc("compile", model_path, "--calib", npz, "-o", out, "--no-verify", cwd=tmp_path)
    if proc.returncode != 0:
        assert_one_line_error(proc, "insert-qdq")
        assert not out.exists()


def test_old_opset_model_compiles(tmp_path: Path) -> None:
    model_path = old_opset_model(tmp_path / "old.onnx", 11)
    npz = save_npz(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    proc = qc("compile", model_path, "--calib", npz, "-o", out, "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize("where", ["same-folder", "ancestor-folder"])
def test_force_never_deletes_the_input(tmp_path: Path, where: str) -> None:
    work = tmp_path / "work"
    inputs = work if where == "same-folder" else work / "models"
    inputs.mkdir(parents=True)
    model_path = tiny_model(inputs / "tiny.onnx", "Sin")
    npz = save_npz(inputs / "tiny.npz", input=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    before_model, before_npz = snapshot(model_path), snapshot(npz)
    proc = qc("compile", model_path, "--calib", npz, "-o", work, "--force", "--no-verify", cwd=tmp_path)
    if proc.returncode != 0:
        assert_one_line_error(proc, str(work))
    assert model_path.exists(), "--force deleted the input model"
    assert npz.exists(), "--force deleted the calibration data"
    assert snapshot(model_path) == before_model
    assert snapshot(npz) == before_npz


def test_an_index_out_of_range_in_the_data_is_one_line_naming_the_file_and_node(tmp_path: Path) -> None:
    """onnxruntime's Gather error on token ids past the embedding: not C++ text, not a traceback."""
    import subprocess
    import sys

    from onnx import TensorProto, helper, numpy_helper, save

    table = numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (10, 4)).astype(np.float32), "table")
    weight = numpy_helper.from_array(np.random.default_rng(1).normal(0, 1, (4, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"), helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 3])], initializer=[table, weight])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "ids.npz", ids=np.full((8, 5), 99, np.int64))  # the table has 10 rows
    done = subprocess.run([sys.executable, "-c", "from qcompiler.cli import main; main()", "compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "ids.npz"),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "onnxruntime failed running" in done.stderr and "ids.npz" in done.stderr and "embed" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_float_model_that_overflows_on_the_data_is_one_line(tmp_path: Path) -> None:
    """The calibration run meets Inf inside the float model (not in the data file): one line naming
    the tensor and the data, exit 2, nothing written."""
    import subprocess
    import sys

    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (4, 3, 3, 3)).astype(np.float32), "w")
    big = numpy_helper.from_array(np.array(1e38, np.float32), "big")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "big"], ["m"], name="scale_up"), helper.make_node("Conv", ["m", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], initializer=[w, big])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.full((8, 3, 8, 8), 100.0, np.float32))
    done = subprocess.run([sys.executable, "-c", "from qcompiler.cli import main; main()", "compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npz"),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is infinite on the calibration data" in done.stderr and "x.npz" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_size_line_of_a_model_without_weights_does_not_crash() -> None:
    from qcompiler.report import _smaller

    assert _smaller(0, 0) == "no weights to compare" and _smaller(100, 0) == "nothing left" and _smaller(400, 100) == "4.00x smaller"
