"""Target descriptions: the built-in ort-cpu, user files with ``extends``, and errors naming ``path:key``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qcompiler.errors import QCError
from qcompiler.pipeline import parse_pipeline
from qcompiler.targets.spec import TargetSpec, list_targets, load_target, target_to_toml


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_error(target: str | Path) -> QCError:
    with pytest.raises(QCError) as info:
        load_target(str(target))
    exc = info.value
    assert "\n" not in str(exc), "an error must fit on one line"
    return exc


def assert_names(exc: QCError, path: Path, key: str) -> None:
    where = f"{path}:{key}"
    assert exc.file == where, f"expected file={where!r}, got {exc.file!r} ({exc})"
    assert str(exc).startswith(where), str(exc)


def without_path(spec: TargetSpec) -> TargetSpec:
    return dataclasses.replace(spec, path="")


@pytest.fixture(scope="module")
def ort_cpu() -> TargetSpec:
    return load_target("ort-cpu")


@pytest.fixture
def full_toml(ort_cpu: TargetSpec) -> str:
    """A complete target file without ``extends`` (ort-cpu written out)."""
    return target_to_toml(ort_cpu)


# --------------------------------------------------------------------------------------------
# the built-in target
# --------------------------------------------------------------------------------------------


def test_ort_cpu_fields(ort_cpu: TargetSpec) -> None:
    assert ort_cpu.name == "ort-cpu"
    assert ort_cpu.description
    assert Path(ort_cpu.path).name == "ort-cpu.toml"
    assert ort_cpu.min_opset == 13

    a = ort_cpu.activations
    assert (a.dtype, a.symmetric, a.granularity) == ("uint8", False, "per-tensor")
    assert a.qrange == (0, 255)
    assert a.bits == 8

    w = ort_cpu.weights
    assert (w.dtype, w.symmetric, w.granularity, w.narrow_range) == ("int8", True, "per-channel", True)
    assert w.qrange == (-127, 127)
    assert w.levels == 255

    assert ort_cpu.bias.quantize is True and ort_cpu.bias.dtype == "int32"
    assert ort_cpu.quantizes("Conv")
    assert ort_cpu.quantizes("Gemm")
    assert not ort_cpu.quantizes("Sin")
    assert not ort_cpu.quantizes("Softmax")
    assert "Relu" in ort_cpu.ops.fused_activations
    assert "MaxPool" in ort_cpu.ops.passthrough
    assert ort_cpu.ops.quantize_graph_outputs is False
    assert ort_cpu.cost.source
    assert ort_cpu.cost.mac["float32"] == 1.0


def test_ort_cpu_pipeline_parses(ort_cpu: TargetSpec) -> None:
    manager = parse_pipeline(ort_cpu.pipeline)
    names = [p.name for p in manager.passes]
    assert "calibrate" in names and "insert-qdq" in names
    assert names.index("calibrate") < names.index("insert-qdq")


def test_spec_is_frozen(ort_cpu: TargetSpec) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ort_cpu.min_opset = 7  # type: ignore[misc]


def test_list_targets() -> None:
    targets = list_targets()
    assert "ort-cpu" in targets
    assert targets == sorted(targets)
    for name in targets:
        assert load_target(name).name == name


def test_builtin_by_path(ort_cpu: TargetSpec) -> None:
    assert without_path(load_target(ort_cpu.path)) == without_path(ort_cpu)


# --------------------------------------------------------------------------------------------
# user files
# --------------------------------------------------------------------------------------------


def test_extends_overrides_one_section_key_and_keeps_the_rest(tmp_path: Path, ort_cpu: TargetSpec) -> None:
    path = write(tmp_path / "mine.toml", 'extends = "ort-cpu"\n[activations]\ndtype = "int8"\nsymmetric = true\n')
    spec = load_target(str(path))
    assert spec.activations.dtype == "int8"
    assert spec.activations.symmetric is True
    assert spec.activations.granularity == "per-tensor"
    assert spec.activations.qrange == (-128, 127)
    assert spec.weights == ort_cpu.weights
    assert spec.bias == ort_cpu.bias
    assert spec.ops == ort_cpu.ops
    assert spec.cost == ort_cpu.cost
    assert spec.pipeline == ort_cpu.pipeline
    assert spec.min_opset == ort_cpu.min_opset
    assert spec.name == ort_cpu.name
    assert spec.path == str(path)


def test_extends_overrides_top_level_and_list(tmp_path: Path, ort_cpu: TargetSpec) -> None:
    path = write(
        tmp_path / "mine.toml",
        'extends = "ort-cpu"\nname = "mine"\nmin_opset = 17\npipeline = "infer-shapes,calibrate{method=mse},insert-qdq"\n'
        '[ops]\nquantized = ["Conv"]\n[cost.mac]\nint8 = 0.25\n',
    )
    spec = load_target(str(path))
    assert (spec.name, spec.min_opset) == ("mine", 17)
    assert spec.pipeline == "infer-shapes,calibrate{method=mse},insert-qdq"
    assert spec.ops.quantized == ("Conv",)
    assert spec.ops.passthrough == ort_cpu.ops.passthrough  # tables merge key by key
    assert spec.cost.mac == {"float32": 1.0, "int8": 0.25}
    assert spec.description == ort_cpu.description


def test_extends_a_relative_file(tmp_path: Path, ort_cpu: TargetSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """``extends`` paths are relative to the extending file, not the working directory."""
    folder = tmp_path / "targets"
    folder.mkdir()
    write(folder / "base.toml", 'extends = "ort-cpu"\nname = "base"\n[weights]\ngranularity = "per-tensor"\n')
    child = write(folder / "child.toml", 'extends = "base.toml"\nname = "child"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_target(str(child))
    assert spec.name == "child"
    assert spec.weights.granularity == "per-tensor"
    assert spec.activations == ort_cpu.activations


def test_complete_file_without_extends(tmp_path: Path, full_toml: str, ort_cpu: TargetSpec) -> None:
    path = write(tmp_path / "full.toml", full_toml)
    assert without_path(load_target(str(path))) == without_path(ort_cpu)


# --------------------------------------------------------------------------------------------
# target_to_toml
# --------------------------------------------------------------------------------------------


def test_target_to_toml_reloads_equal(tmp_path: Path, ort_cpu: TargetSpec) -> None:
    path = write(tmp_path / "dump.toml", target_to_toml(ort_cpu))
    again = load_target(str(path))
    assert again.path == str(path)
    for f in dataclasses.fields(TargetSpec):
        if f.name != "path":
            assert getattr(again, f.name) == getattr(ort_cpu, f.name), f.name


# Both kinds of x86 CPU, whichever this one is: ort-cpu's [cpu] table resolves differently on each.
@pytest.mark.parametrize("cpu", ["avx512-vnni", "avx2"])
def test_target_to_toml_of_extended_spec_reloads_equal(tmp_path: Path, cpu: str) -> None:
    user = write(
        tmp_path / "mine.toml",
        'extends = "ort-cpu"\nname = "mine"\ndescription = "quotes \\" and \\\\ backslash"\n'
        '[activations]\ndtype = "int8"\nsymmetric = true\n[weights]\ndtype = "int4"\nnarrow_range = false\n',
    )
    spec = load_target(str(user), cpu=cpu)
    assert spec.machine is not None and spec.machine.isa == cpu
    dumped = write(tmp_path / "dump.toml", target_to_toml(spec))
    assert "extends" not in dumped.read_text()
    assert without_path(load_target(str(dumped), cpu=cpu)) == without_path(spec)


def test_int16_pair_accumulation_narrows_int8_weights_only(tmp_path: Path) -> None:
    """On a CPU that sums pairs of products in int16 (AVX2), full-range int8 weights are narrowed,
    int4 weights cannot overflow and keep their range, and weights the narrowing cannot handle
    (asymmetric) are refused; a VNNI CPU takes all three as they are."""
    assert load_target("ort-cpu", cpu="avx2").weights.pair_sum_limit == 128
    assert load_target("ort-cpu", cpu="avx512-vnni").weights.pair_sum_limit is None
    int4 = write(tmp_path / "int4.toml", 'extends = "ort-cpu"\n[weights]\ndtype = "int4"\nnarrow_range = false\n')
    spec = load_target(str(int4), cpu="avx2")
    assert spec.machine.accumulation == "int16-pairs" and spec.weights.pair_sum_limit is None and spec.weights.qrange == (-8, 7)
    assert "int4 weights cannot overflow" in spec.machine.reason
    asymmetric = write(tmp_path / "asym.toml", 'extends = "ort-cpu"\n[weights]\nsymmetric = false\n')
    assert load_target(str(asymmetric), cpu="avx512-vnni").weights.pair_sum_limit is None
    with pytest.raises(QCError) as info:
        load_target(str(asymmetric), cpu="avx2")
    assert_names(info.value, asymmetric, "cpu.accumulation")
    assert "symmetric int8 weights" in info.value.message


def test_target_to_toml_escapes_control_characters(tmp_path: Path) -> None:
    user = write(tmp_path / "mine.toml", 'extends = "ort-cpu"\ndescription = "two\\nlines\\ttab"\n')
    spec = load_target(str(user))
    assert spec.description == "two\nlines\ttab"
    dumped = write(tmp_path / "dump.toml", target_to_toml(spec))
    assert load_target(str(dumped)).description == spec.description


def test_target_to_toml_quotes_cost_keys(tmp_path: Path) -> None:
    user = write(tmp_path / "mine.toml", 'extends = "ort-cpu"\n[cost.mac]\n"float 16" = 0.8\n')
    spec = load_target(str(user))
    dumped = write(tmp_path / "dump.toml", target_to_toml(spec))
    assert load_target(str(dumped)).cost.mac == spec.cost.mac


# --------------------------------------------------------------------------------------------
# errors, each naming path:key
# --------------------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nbogus = 1\n')
    exc = load_error(path)
    assert_names(exc, path, "bogus")
    assert "unknown key" in exc.message and "pipeline" in exc.message


def test_unknown_section_key(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[activations]\ncolour = "red"\n')
    exc = load_error(path)
    assert_names(exc, path, "activations.colour")
    assert "dtype" in exc.message and "granularity" in exc.message


def test_unknown_key_in_a_complete_file(tmp_path: Path, full_toml: str) -> None:
    path = write(tmp_path / "t.toml", full_toml.replace("[ops]\n", "[ops]\nquantised = []\n"))
    assert_names(load_error(path), path, "ops.quantised")


def test_wrong_type_min_opset_string(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nmin_opset = "13"\n')
    exc = load_error(path)
    assert_names(exc, path, "min_opset")
    assert "int" in exc.message


def test_wrong_type_min_opset_bool(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nmin_opset = true\n')
    assert_names(load_error(path), path, "min_opset")


def test_wrong_type_symmetric_int(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[weights]\nsymmetric = 1\n')
    exc = load_error(path)
    assert_names(exc, path, "weights.symmetric")
    assert "bool" in exc.message


def test_wrong_type_list(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[ops]\nquantized = "Conv"\n')
    assert_names(load_error(path), path, "ops.quantized")


def test_list_of_non_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[ops]\npassthrough = ["Reshape", 3]\n')
    assert_names(load_error(path), path, "ops.passthrough")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nactivations = 5\n')
    exc = load_error(path)
    assert_names(exc, path, "activations")
    assert "unknown key" not in exc.message


def test_section_that_is_not_a_table_still_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nactivations = 5\n')
    assert_names(load_error(path), path, "activations")


@pytest.mark.parametrize("section", ["activations", "weights"])
def test_bad_dtype(tmp_path: Path, section: str) -> None:
    path = write(tmp_path / "t.toml", f'extends = "ort-cpu"\n[{section}]\ndtype = "int7"\n')
    exc = load_error(path)
    assert_names(exc, path, f"{section}.dtype")
    assert "int7" in exc.message and "int8" in exc.message and "uint8" in exc.message


def test_int32_is_not_a_tensor_dtype(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[weights]\ndtype = "int32"\n')
    assert_names(load_error(path), path, "weights.dtype")


def test_bad_granularity(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[weights]\ngranularity = "per-row"\n')
    exc = load_error(path)
    assert_names(exc, path, "weights.granularity")
    assert "per-tensor" in exc.message and "per-channel" in exc.message


def test_per_channel_activations_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[activations]\ngranularity = "per-channel"\n')
    assert_names(load_error(path), path, "activations.granularity")


def test_implausible_opset(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nmin_opset = 3\n')
    assert_names(load_error(path), path, "min_opset")


def test_bad_bias_dtype(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[bias]\ndtype = "int16"\n')
    assert_names(load_error(path), path, "bias.dtype")


def test_bad_cost(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[cost.mac]\nint8 = -1.0\n')
    assert_names(load_error(path), path, "cost.mac.int8")


def test_missing_required_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'name = "x"\nmin_opset = 13\n')
    exc = load_error(path)
    assert_names(exc, path, "pipeline")
    assert "missing" in exc.message


@pytest.mark.parametrize(("section", "key"), [("activations", "dtype"), ("weights", "symmetric"), ("cost", "source"), ("ops", "quantized")])
def test_missing_required_section_key(tmp_path: Path, full_toml: str, section: str, key: str) -> None:
    lines = full_toml.splitlines(keepends=True)
    start = lines.index(f"[{section}]\n")
    for i in range(start + 1, len(lines)):
        if lines[i].startswith(f"{key} ="):
            del lines[i]
            break
    else:  # pragma: no cover - the fixture is ort-cpu written out
        pytest.fail(f"{section}.{key} not in the dumped target")
    path = write(tmp_path / "t.toml", "".join(lines))
    exc = load_error(path)
    assert_names(exc, path, f"{section}.{key}")
    assert "missing" in exc.message


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'name = "unterminated\n')
    exc = load_error(path)
    assert exc.file is not None and exc.file.startswith(str(path))
    assert "TOML" in exc.message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.toml"
    exc = load_error(path)
    assert exc.file == str(path)


def test_extends_cycle(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    b = tmp_path / "b.toml"
    write(a, 'extends = "b.toml"\nname = "a"\n')
    write(b, 'extends = "a.toml"\nname = "b"\n')
    exc = load_error(a)
    assert exc.file is not None and exc.file.endswith(":extends")
    assert exc.file.split(":")[0] in (str(a), str(b))
    assert "cycle" in exc.message


def test_extends_itself(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'extends = "a.toml"\n')
    exc = load_error(a)
    assert_names(exc, a, "extends")
    assert "cycle" in exc.message


def test_extends_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "nowhere.toml"\n')
    exc = load_error(path)
    assert "nowhere.toml" in str(exc)


def test_extends_unknown_target_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "nope"\n')
    exc = load_error(path)
    assert "nope" in exc.message and "ort-cpu" in exc.message


def test_extends_unknown_target_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "nope"\n')
    exc = load_error(path)
    assert_names(exc, path, "extends")
    assert exc.option != "--target"


def test_error_in_the_extended_file_names_that_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.toml", 'extends = "ort-cpu"\n[weights]\nsymmetric = "yes"\n')
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n')
    assert_names(load_error(child), base, "weights.symmetric")


@pytest.mark.parametrize("pipeline", ["calibrate{method=mse", "calibrate}", "", "calibrate{mse}"])
def test_bad_pipeline_text_in_file(tmp_path: Path, pipeline: str) -> None:
    path = write(tmp_path / "t.toml", f'extends = "ort-cpu"\npipeline = "{pipeline}"\n')
    exc = load_error(path)
    assert_names(exc, path, "pipeline")


def test_unknown_target_name() -> None:
    exc = load_error("nope")
    assert "nope" in exc.message and "ort-cpu" in exc.message


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


def qc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    return subprocess.run([sys.executable, "-m", "qcompiler.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_targets_lists_ort_cpu(tmp_path: Path) -> None:
    proc = qc("targets", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ort-cpu" in proc.stdout


def test_cli_targets_show(tmp_path: Path) -> None:
    proc = qc("targets", "show", "ort-cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'name = "ort-cpu"' in proc.stdout
    assert "min_opset = 13" in proc.stdout


def test_cli_targets_show_user_file(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.toml", 'extends = "ort-cpu"\nname = "mine"\n[activations]\ndtype = "int8"\n')
    proc = qc("targets", "show", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'name = "mine"' in proc.stdout
    assert 'dtype = "int8"' in proc.stdout
    assert 'granularity = "per-channel"' in proc.stdout  # inherited weights


def test_cli_targets_show_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.toml", 'extends = "ort-cpu"\nbogus = 1\n')
    proc = qc("targets", "show", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:bogus" in lines[0]


def test_cli_targets_show_unknown(tmp_path: Path) -> None:
    proc = qc("targets", "show", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0]


def test_integer_passthrough_must_be_passthrough_ops(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('extends = "ort-cpu"\nname = "bad"\n[ops]\ninteger_passthrough = ["Conv"]\n')
    with pytest.raises(QCError) as info:
        load_target(str(path))
    assert f"{path}:ops.integer_passthrough" in str(info.value) and "Conv" in str(info.value)


def test_tensorrt_description() -> None:
    trt = load_target("tensorrt")
    assert (trt.activations.dtype, trt.activations.symmetric) == ("int8", True)
    assert (trt.weights.dtype, trt.weights.symmetric, trt.weights.granularity) == ("int8", True, "per-channel")
    assert not trt.bias.quantize
    assert (trt.ops.placement, trt.ops.activation_fusion, trt.ops.float_fallback) == ("inputs", "keep", True)
    assert trt.min_opset >= 13


@pytest.mark.parametrize(("key", "value"), [("placement", "everywhere"), ("activation_fusion", "fuse")])
def test_bad_op_choice(tmp_path: Path, key: str, value: str) -> None:
    path = write(tmp_path / "t.toml", f'extends = "ort-cpu"\n[ops]\n{key} = "{value}"\n')
    exc = load_error(path)
    assert_names(exc, path, f"ops.{key}")


def test_also_accepted_dtypes(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[activations]\nalso_accepted = ["uint16"]\n')
    assert load_target(str(path)).activations.accepted == ("uint8", "uint16")
    bad = write(tmp_path / "b.toml", 'extends = "ort-cpu"\n[activations]\nalso_accepted = ["float7"]\n')
    assert_names(load_error(bad), bad, "activations.also_accepted")


def test_ort_cpu_int4_is_weight_only_and_block_wise() -> None:
    int4 = load_target("ort-cpu-int4")
    assert not int4.activations.quantize
    assert (int4.weights.granularity, int4.weights.block_size, int4.min_opset) == ("per-block", 32, 21)
    assert int4.bits.default == 4 and 4 in int4.bits.native and 8 in int4.bits.allowed


def test_weight_only_target_needs_no_activation_keys(tmp_path: Path) -> None:
    text = target_to_toml(load_target("ort-cpu-int4"))
    assert "[activations]\nquantize = false\n" in text
    reloaded = load_target(str(write(tmp_path / "t.toml", text)))
    assert without_path(reloaded) == without_path(load_target("ort-cpu-int4"))


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[weights]\ngranularity = "per-block"\n', "weights.block_size"),  # no block size
        ('min_opset = 21\n[weights]\ngranularity = "per-block"\nblock_size = 1\n', "weights.block_size"),
        ('[weights]\nblock_size = 32\n', "weights.block_size"),  # block size without per-block
        ('[weights]\ngranularity = "per-block"\nblock_size = 32\n', "min_opset"),  # opset 13 has no block_size
        ('[bits]\ndefault = 7\n', "bits.default"),
        ('[cost.op.Conv]\nint8 = 0\n', "cost.op.Conv.int8"),
    ],
)
def test_block_default_and_op_cost_errors(tmp_path: Path, body: str, key: str) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n' + body)
    assert_names(load_error(path), path, key)


def test_op_costs_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[cost.op.Conv]\nint8 = 0.5\n[cost.op.MatMul]\nint8 = 0.25\n')
    spec = load_target(str(path))
    assert spec.cost.per_mac("Conv", "int8") == 0.5 and spec.cost.per_mac("Gemm", "int8") == spec.cost.mac["int8"]
    dumped = write(tmp_path / "d.toml", target_to_toml(spec))
    assert load_target(str(dumped)).cost == spec.cost


# --------------------------------------------------------------------------------------------
# 1-bit (bipolar) weights
# --------------------------------------------------------------------------------------------


def test_qonnx_allows_bipolar_weights() -> None:
    qonnx = load_target("qonnx")
    assert qonnx.bits.allowed[0] == 1 and 1 not in qonnx.bits.activations


def test_one_bit_weights_on_a_symmetric_signed_rule(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[bits]\nallowed = [1, 2, 8]\n')
    spec = load_target(str(path))
    assert spec.bits.allowed == (1, 2, 8)
    dumped = write(tmp_path / "d.toml", target_to_toml(spec))
    assert load_target(str(dumped)).bits == spec.bits


def test_float8_weights_drop_an_inherited_one_bit(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "qonnx"\nmin_opset = 19\n[weights]\ndtype = "float8e4m3fn"\nnarrow_range = false\n')
    assert load_target(str(path)).bits.allowed == (8,)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('extends = "qonnx"\n[weights]\nsymmetric = false\nnarrow_range = false\n', "bits.allowed"),  # asymmetric
        ('extends = "ort-cpu"\n[weights]\ndtype = "uint8"\nnarrow_range = false\n[bits]\nallowed = [1, 8]\n', "bits.allowed"),  # unsigned
        ('extends = "qonnx"\n[bits]\nactivations = [1, 8]\n', "bits.activations"),
        ('extends = "ort-cpu"\n[bits]\nnative = [1, 8]\n', "bits.native"),
        ('extends = "ort-cpu"\n[bits]\nallowed = [0, 8]\n', "bits.allowed"),
    ],
)
def test_one_bit_errors(tmp_path: Path, body: str, key: str) -> None:
    path = write(tmp_path / "t.toml", body)
    exc = load_error(path)
    assert_names(exc, path, key)
    if key == "bits.allowed" and "[0, 8]" not in body:
        assert "1-bit (bipolar) weights need a symmetric signed weight rule" in str(exc)
    if key == "bits.activations":
        assert "weights only" in str(exc)


# --------------------------------------------------------------------------------------------
# mixed_pipeline: what `qc compile --budget` runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ort-cpu", "ort-cpu-int4", "qnn", "qonnx", "tensorrt"])
def test_builtin_mixed_pipeline_parses_and_leaves_the_budget_open(name: str) -> None:
    spec = load_target(name)
    passes = parse_pipeline(spec.mixed_pipeline).passes
    names = [p.name for p in passes]
    assert names.index("hessian-trace") < names.index("assign-precision") < names.index("insert-qdq")
    assert len(spec.bits.allowed) > 1


def test_single_width_target_has_no_mixed_pipeline(tmp_path: Path) -> None:
    # tensorrt-fp8 extends tensorrt: float8 has one width, so the inherited pipeline does not apply.
    assert load_target("tensorrt").mixed_pipeline and load_target("tensorrt-fp8").mixed_pipeline == ""
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[bits]\nallowed = [8]\n')
    assert load_target(str(path)).mixed_pipeline == ""


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("infer-shapes,calibrate,insert-qdq", "one assign-precision pass"),
        ("hessian-trace,assign-precision,assign-precision,insert-qdq", "found 2"),
        ("hessian-trace,assign-precision{budget=size=0.5},insert-qdq", "--budget sets it"),
        ("hessian-trace,assign-precision{method=ilp", "never closed"),
    ],
)
def test_bad_mixed_pipeline_in_file(tmp_path: Path, pipeline: str, message: str) -> None:
    path = write(tmp_path / "t.toml", f'extends = "ort-cpu"\nmixed_pipeline = "{pipeline}"\n')
    exc = load_error(path)
    assert_names(exc, path, "mixed_pipeline")
    assert message in exc.message


def test_mixed_pipeline_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nmixed_pipeline = ["hessian-trace"]\n')
    assert_names(load_error(path), path, "mixed_pipeline")


# --------------------------------------------------------------------------------------------
# [ops.kept_float]: activations a target leaves float on purpose, with the measured reason
# --------------------------------------------------------------------------------------------


def test_ort_cpu_quantizes_sigmoid_and_leakyrelu_and_says_why_others_stay_float(ort_cpu: TargetSpec) -> None:
    # onnxruntime has QLinearSigmoid/QLinearLeakyRelu; the others have no integer kernel there.
    assert ort_cpu.quantizes("Sigmoid") and ort_cpu.quantizes("LeakyRelu")
    for op in ("HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu", "Softplus"):
        assert not ort_cpu.quantizes(op)
        reason = ort_cpu.ops.float_reason(op)
        assert reason and "bench/activations.py" in reason and "\n" not in reason
    assert ort_cpu.ops.float_reason("Sigmoid") is None and ort_cpu.ops.float_reason("Sin") is None


def test_kept_float_extends_and_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\nname = "t"\n[ops.kept_float]\nSin = "measured   slower\\nin my runtime"\n')
    spec = load_target(str(path))
    # Merged with the base's table, whitespace of the reason normalised to one line.
    assert spec.ops.float_reason("Sin") == "measured slower in my runtime"
    assert spec.ops.float_reason("Tanh") == load_target("ort-cpu").ops.float_reason("Tanh")
    again = write(tmp_path / "again.toml", target_to_toml(spec))
    assert without_path(load_target(str(again))).ops == spec.ops


@pytest.mark.parametrize("value", ['""', "3", "[\"a\"]"])
def test_kept_float_reason_must_be_a_non_empty_string(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "t.toml", f'extends = "ort-cpu"\n[ops.kept_float]\nTanh = {value}\n')
    exc = load_error(path)
    assert_names(exc, path, "ops.kept_float.Tanh")


def test_kept_float_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", 'extends = "ort-cpu"\n[ops]\nkept_float = ["Tanh"]\n')
    exc = load_error(path)
    assert_names(exc, path, "ops.kept_float")


# [speed]: the per-layer speed check


def test_speed_check_is_on_for_ort_cpu_only() -> None:
    """ort-cpu times its layers on the compiling CPU by default; every other built-in target
    (other backends, or weight-only int4 with no quantizer boundary to weigh) leaves it off."""
    ort = load_target("ort-cpu").speed
    assert ort.keep_slower_float and ort.min_slowdown > 1.0 and ort.min_difference_ms > 0.0
    assert [name for name in list_targets() if load_target(name).speed.keep_slower_float] == ["ort-cpu"]


def test_speed_keys_extend_and_reload(tmp_path: Path) -> None:
    user = write(tmp_path / "mine.toml", 'extends = "ort-cpu"\nname = "mine"\n[speed]\nmin_slowdown = 1.3\n')
    spec = load_target(str(user))
    assert (spec.speed.keep_slower_float, spec.speed.min_slowdown, spec.speed.min_difference_ms) == (True, 1.3, load_target("ort-cpu").speed.min_difference_ms)
    off = load_target(str(write(tmp_path / "off.toml", 'extends = "ort-cpu"\nname = "off"\n[speed]\nkeep_slower_float = false\n')))
    assert not off.speed.keep_slower_float
    dumped = write(tmp_path / "dump.toml", target_to_toml(spec))
    assert load_target(str(dumped)).speed == spec.speed


@pytest.mark.parametrize(("body", "key"), [("min_slowdown = 0.9", "speed.min_slowdown"), ("min_difference_ms = -1", "speed.min_difference_ms"), ("keep_slower_float = 1", "speed.keep_slower_float"), ("margin = 2", "speed.margin")])
def test_bad_speed_keys_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = write(tmp_path / "bad.toml", f'extends = "ort-cpu"\nname = "bad"\n[speed]\n{body}\n')
    assert_names(load_error(path), path, key)


def test_low_bit_range_full_gives_every_code_below_the_dtype_width(tmp_path: Path, ort_cpu: TargetSpec) -> None:
    from qcompiler.quant.weights import weight_qrange

    path = write(tmp_path / "full.toml", 'extends = "ort-cpu"\n[weights]\nlow_bit_range = "full"\n')
    spec = load_target(str(path))
    assert spec.weights.low_bit_range == "full"
    assert [weight_qrange(spec.weights, b) for b in (1, 2, 3, 4, 7, 8)] == [(-1, 1), (-2, 1), (-4, 3), (-8, 7), (-64, 63), (-127, 127)]
    # Unset: as narrow_range says, at every width (the built-in ort-cpu).
    assert ort_cpu.weights.low_bit_range is None
    assert [weight_qrange(ort_cpu.weights, b) for b in (2, 3, 8)] == [(-1, 1), (-3, 3), (-127, 127)]
    narrow = load_target(str(write(tmp_path / "narrow.toml", 'extends = "ort-cpu"\n[weights]\nnarrow_range = false\nlow_bit_range = "narrow"\n')))
    assert [weight_qrange(narrow.weights, b) for b in (2, 8)] == [(-1, 1), (-128, 127)]
    # Written out and read back equal.
    again = load_target(str(write(tmp_path / "again.toml", target_to_toml(spec))))
    assert again.weights == spec.weights


@pytest.mark.parametrize(("body", "needle"), [('low_bit_range = "wide"', "'wide' is not one of: narrow, full"),
                                               ('dtype = "uint8"\nsymmetric = false\nlow_bit_range = "full"', "symmetric signed integer")])
def test_bad_low_bit_range(tmp_path: Path, body: str, needle: str) -> None:
    path = write(tmp_path / "t.toml", f'extends = "ort-cpu"\n[weights]\n{body}\n')
    exc = load_error(path)
    assert_names(exc, path, "weights.low_bit_range")
    assert needle in exc.message
