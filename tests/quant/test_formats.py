"""Number formats: bit-exact against ml_dtypes' casts and onnxruntime's QuantizeLinear, exact
integer / fixed point / block numerics, and the parser's names and errors."""

from __future__ import annotations

import re
import math

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qcompiler.errors import QCError
from qcompiler.quant.formats import BlockFormat, FixedFormat, FloatFormat, IntFormat, parse_format

#: Our name -> ml_dtypes' type.
ML_DTYPES = {
    "e4m3fn": ml_dtypes.float8_e4m3fn, "e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "e5m2": ml_dtypes.float8_e5m2,
    "e5m2fnuz": ml_dtypes.float8_e5m2fnuz, "e4m3": ml_dtypes.float8_e4m3, "e3m4": ml_dtypes.float8_e3m4,
    "e2m1": ml_dtypes.float4_e2m1fn, "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn,
    "e8m0": ml_dtypes.float8_e8m0fnu, "fp16": np.float16, "bf16": ml_dtypes.bfloat16,
}


def _all_float16() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _random_float32(n: int = 10**6) -> np.ndarray:
    rng = np.random.default_rng(0)
    # Every binade from far below the smallest subnormal to past float32's largest (Inf).
    with np.errstate(over="ignore"):
        return (rng.normal(0, 1, n) * np.exp2(rng.uniform(-140, 130, n))).astype(np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_rounding_is_bit_exact_against_ml_dtypes_casts(name: str) -> None:
    fmt = parse_format(name)
    for x in (_all_float16(), _random_float32()):
        ours = fmt.round(x, saturate=False)
        with np.errstate(over="ignore", invalid="ignore"):
            theirs = x.astype(ML_DTYPES[name]).astype(np.float32)
        # ml_dtypes casts NaN to -0 in the types without NaN; ours keeps NaN there.
        checked = np.ones(x.shape, bool) if fmt.has_nan else ~np.isnan(x)
        wrong = np.flatnonzero(~_same_bits(ours, theirs) & checked)
        assert wrong.size == 0, [(x[i], ours[i], theirs[i]) for i in wrong[:5]]


@pytest.mark.parametrize(("name", "onnx_type"), [("e4m3fn", TensorProto.FLOAT8E4M3FN), ("e4m3fnuz", TensorProto.FLOAT8E4M3FNUZ),
                                                 ("e5m2", TensorProto.FLOAT8E5M2), ("e5m2fnuz", TensorProto.FLOAT8E5M2FNUZ)])
def test_saturating_rounding_is_what_onnxruntime_quantizelinear_stores(name: str, onnx_type: int) -> None:
    """The lowering of a float8 tensor: QuantizeLinear (saturate=1) then DequantizeLinear in
    onnxruntime gives exactly our values, Inf and overflow included."""
    x = np.concatenate([_all_float16(), _random_float32(200_000)])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], saturate=1), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("z", onnx_type, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    runtime = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours = parse_format(name).round(x, saturate=True)
    wrong = np.flatnonzero(~_same_bits(ours, runtime))
    assert wrong.size == 0, [(x[i], ours[i], runtime[i]) for i in wrong[:5]]


@pytest.mark.parametrize(("name", "largest", "smallest_subnormal"), [
    ("e4m3fn", 448.0, 2.0**-9), ("e4m3fnuz", 240.0, 2.0**-10), ("e5m2", 57344.0, 2.0**-16), ("e5m2fnuz", 57344.0, 2.0**-17),
    ("e2m1", 6.0, 0.5), ("e2m3", 7.5, 0.125), ("e3m2", 28.0, 0.0625), ("fp16", 65504.0, 2.0**-24),
])
def test_ranges_and_value_tables(name: str, largest: float, smallest_subnormal: float) -> None:
    fmt = parse_format(name)
    values = fmt.values()
    assert fmt.max_value == largest == values.max() and -largest == values.min()
    assert values[values > 0].min() == smallest_subnormal
    assert fmt.representable(values).all()
    # A value table is exactly the set rounding reaches.
    np.testing.assert_array_equal(np.unique(fmt.round(values)), values)


def test_the_mx_element_types_have_the_spec_value_counts() -> None:
    assert parse_format("e2m1").values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert len(parse_format("e2m3").values()) == 63 and len(parse_format("e3m2").values()) == 63  # 64 codes, +-0 one value
    assert parse_format("e8m0").values().size == 255 and parse_format("e8m0").min_value == 2.0**-127


def test_flags_change_the_values() -> None:
    plain = parse_format("float<4,3>")
    assert plain.max_value == 240.0 and plain.has_inf  # IEEE-style: the top exponent is Inf/NaN
    assert parse_format("float<4,3,fn>") == parse_format("e4m3fn")
    flushed = parse_format("float<4,3,fn,nosub>")
    assert flushed.round(np.float32(2.0**-9)) == 0 and flushed.round(np.float32(2.0**-6 * 0.6)) == 2.0**-6
    biased = parse_format("float<4,3,bias=11,fn>")
    assert biased.max_value == 448.0 / 16 and biased.round(np.float32(2.0**-13)) == 2.0**-13


def test_rounding_modes() -> None:
    fmt = parse_format("int8")
    ties = np.array([0.5, 1.5, 2.5, -0.5, -2.5], np.float32)
    assert fmt.round(ties).tolist() == [0, 2, 2, -0, -2]
    assert fmt.round(ties, rounding="nearest-away").tolist() == [1, 2, 3, -1, -3]
    x = np.full(200_000, 0.3, np.float32)
    stochastic = fmt.round(x, rounding="stochastic", rng=np.random.default_rng(1))
    assert set(np.unique(stochastic)) == {0.0, 1.0} and abs(stochastic.mean() - 0.3) < 0.005
    e4m3 = parse_format("e4m3fn")
    assert e4m3.round(np.float32(17.0), rounding="nearest-away") == 18.0 and e4m3.round(np.float32(17.0)) == 16.0
    with pytest.raises(QCError, match="unknown rounding 'up'.*nearest-even"):
        fmt.round(x, rounding="up")  # type: ignore[arg-type]


def test_integer_and_fixed_point_formats() -> None:
    assert (IntFormat(4).min_value, IntFormat(4).max_value, IntFormat(4, signed=False).max_value) == (-8, 7, 15)
    assert parse_format("int<3>") == IntFormat(3) and parse_format("uint16") == IntFormat(16, signed=False)
    np.testing.assert_array_equal(IntFormat(2).round(np.array([-9.0, -1.4, 0.6, 9.0])), [-2, -1, 1, 1])
    fixed = parse_format("fixed<4,3>")
    assert fixed == FixedFormat(4, 3) and fixed.name == "fixed<4,3>" and fixed.bits == 7
    assert (fixed.min_value, fixed.max_value) == (-8.0, 7.875)
    np.testing.assert_array_equal(fixed.round(np.array([0.0624, 0.0626, 100.0, -100.0], np.float32)), [0.0, 0.125, 7.875, -8.0])
    assert fixed.representable(np.array([0.125, 0.1, 8.0])).tolist() == [True, False, False]


@pytest.mark.parametrize("name", ["int8", "uint4", "fixed<4,3>", "ufixed<2,6>", "float<4,3>", "float<5,2,bias=15,fn,nosub>", "e4m3fn", "e5m2fnuz", "fp16", "bf16", "e8m0", "mxfp4", "mxint8", "nvfp4", "bipolar", "int32"])
def test_names_round_trip(name: str) -> None:
    fmt = parse_format(name)
    assert parse_format(fmt.name) == fmt


@pytest.mark.parametrize(("text", "culprit"), [("float<0,3>", "float<0,3> is not a format"), ("int<0>", "1 to 32 bits"), ("int33", "1 to 32 bits"),
                                               ("mxfp5", "unknown number format 'mxfp5'"), ("float<4,3,weird>", "unknown float format flag 'weird'"),
                                               ("fixed<0,4>", "sign among the integer bits"), ("", "unknown number format")])
def test_bad_format_names_list_the_valid_ones(text: str, culprit: str) -> None:
    with pytest.raises(QCError, match=culprit) as error:
        parse_format(text)
    assert "valid formats" in str(error.value) or "not a format" in str(error.value)


def test_mx_block_scales_follow_the_ocp_rule() -> None:
    """OCP MX v1.0: the shared scale is 2**(floor(log2(amax)) - emax_elem), elements are the
    element type's rounding of x / scale (saturating)."""
    mxfp4 = parse_format("mxfp4")
    assert isinstance(mxfp4, BlockFormat) and mxfp4.block_size == 32 and mxfp4.element_emax == 2 and mxfp4.bits == 4.25
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (3, 70)).astype(np.float32)
    elements, scales, tensor_scale = mxfp4.quantize(x, axis=1)
    assert scales.shape == (3, 3) and tensor_scale == 1.0
    moved = np.pad(x, ((0, 0), (0, 26))).reshape(3, 3, 32)
    amax = np.abs(moved).max(axis=2)
    np.testing.assert_array_equal(scales, np.exp2(np.floor(np.log2(amax)) - 2))
    assert parse_format("e2m1").representable(elements).all()
    expected = parse_format("e2m1").round(x / np.repeat(scales, 32, axis=1)[:, :70])
    np.testing.assert_array_equal(elements, expected)
    back = mxfp4.round(x, axis=1)
    assert np.abs(back - x).max() <= np.repeat(scales, 32, axis=1)[:, :70].max() * 2  # within one element step (2 at the top)


def test_mxint8_elements_are_sixty_fourths_and_all_zero_blocks_stay_zero() -> None:
    mxint8 = parse_format("mxint8")
    x = np.zeros((2, 64), np.float32)
    x[0, :32] = np.linspace(-1, 1, 32)
    elements, scales, _ = mxint8.quantize(x)
    assert FixedFormat(2, 6).representable(elements).all()
    assert np.all(elements[1] == 0) and np.all(elements[0, 32:] == 0)
    assert scales[0, 0] == 1.0  # amax 1 = 2**0, emax_elem 0
    np.testing.assert_allclose(mxint8.round(x), x, atol=1 / 128)


def test_nvfp4_keeps_block_scales_within_e4m3_under_a_tensor_scale() -> None:
    nvfp4 = parse_format("nvfp4")
    rng = np.random.default_rng(2)
    x = (rng.normal(0, 1, (4, 64)) * np.array([[1e-3], [1.0], [1e3], [1e5]])).astype(np.float32)
    elements, scales, tensor_scale = nvfp4.quantize(x)
    assert scales.shape == (4, 4) and math.isfinite(tensor_scale) and tensor_scale > 0
    assert parse_format("e4m3fn").representable(scales).all() and scales.max() <= 448
    assert parse_format("e2m1").representable(elements).all()
    back = nvfp4.dequantize(elements, scales, tensor_scale)
    # The largest block's error is bounded by its step; smaller blocks lose more to E4M3's range.
    assert np.abs(back[3] - x[3]).max() <= np.abs(x[3]).max() / 3


def test_e8m0_has_no_sign_no_zero() -> None:
    e8m0 = parse_format("e8m0")
    assert isinstance(e8m0, FloatFormat) and e8m0.bits == 8
    out = e8m0.round(np.array([3.0, 0.0, -1.0, 2.0**-130, 2.0**127], np.float32), saturate=False)
    assert out[0] == 4.0 and np.isnan(out[1]) and np.isnan(out[2]) and out[3] == 2.0**-127 and out[4] == 2.0**127


def test_format_lists_expand_ranges_in_order_without_duplicates() -> None:
    from qcompiler.quant.formats import parse_format_list

    names = [f.name for f in parse_format_list("int<2..4>|float<2..3,1..2>|mxfp4|int4")]
    assert names == ["int2", "int3", "int4", "float<2,1>", "float<2,2>", "float<3,1>", "float<3,2>", "mxfp4"]
    assert [f.name for f in parse_format_list("float<4,3,fn>")] == ["e4m3fn"]


@pytest.mark.parametrize("text, culprit", [("float<0..2,3>", "float<0,3>"), ("int<5..2>", "5..2"), ("", "no format"), ("mxfp5", "mxfp5")])
def test_a_bad_format_list_names_the_item(text: str, culprit: str) -> None:
    from qcompiler.quant.formats import parse_format_list

    with pytest.raises(QCError, match=re.escape(culprit)):
        parse_format_list(text)


def test_one_bit_neighbours_and_chains() -> None:
    from qcompiler.quant.formats import format_chain, one_bit_neighbours

    assert [f.name for f in one_bit_neighbours(parse_format("float<3,2>"), wider=True)] == ["float<3,3>", "float<4,2>"]
    assert [f.name for f in one_bit_neighbours(parse_format("e4m3fn"), wider=False)] == ["float<4,2,fn>", "float<3,3,fn>"]
    assert [f.name for f in one_bit_neighbours(parse_format("int3"), wider=False)] == ["int2"]
    assert one_bit_neighbours(parse_format("int2"), wider=False) == []  # int1 is no useful weight format
    assert one_bit_neighbours(parse_format("mxfp4"), wider=True) == []
    assert format_chain(parse_format("float<3,1>")) == format_chain(parse_format("float<3,5>")) != format_chain(parse_format("float<4,1>"))
    assert format_chain(parse_format("int2")) == format_chain(parse_format("int8")) != format_chain(parse_format("uint8"))
