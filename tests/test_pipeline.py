"""Textual pipelines: parsing into typed pass options, printing back, and every error naming its culprit."""

from __future__ import annotations

import pytest

from qcompiler.errors import QCError
from qcompiler.pass_manager import Pass, PassManager
from qcompiler.pipeline import PassSpec, format_pass, format_pipeline, parse_pipeline, split_pipeline
from qcompiler.registry import all_passes, get_pass


def names(manager: PassManager) -> list[str]:
    return [p.name for p in manager.passes]


def calibrate_options(text: str):
    (pass_,) = parse_pipeline(text).passes
    assert pass_.name == "calibrate"
    return pass_.options


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------


def test_round_trip_canonical_text() -> None:
    text = "fold-batchnorm,calibrate{method=percentile,percentile=99.9},insert-qdq"
    assert format_pipeline(parse_pipeline(text).passes) == text


def test_round_trip_with_explicit_default_reaches_fixed_point() -> None:
    """method=mse is the default, so printing drops it; printing again changes nothing."""
    text = "fold-batchnorm,calibrate{method=mse,percentile=99.9},insert-qdq"
    printed = format_pipeline(parse_pipeline(text).passes)
    assert printed == "fold-batchnorm,calibrate{percentile=99.9},insert-qdq"
    again = parse_pipeline(printed)
    assert format_pipeline(again.passes) == printed
    assert names(again) == ["fold-batchnorm", "calibrate", "insert-qdq"]
    assert again.passes[1].options == parse_pipeline(text).passes[1].options


def test_round_trip_of_every_builtin_target_pipeline() -> None:
    from qcompiler.targets.spec import list_targets, load_target

    for name in list_targets():
        text = load_target(name).pipeline
        first = parse_pipeline(text)
        printed = format_pipeline(first.passes)
        second = parse_pipeline(printed)
        assert names(first) == names(second)
        assert [p.options for p in first.passes] == [p.options for p in second.passes]


def test_a_format_with_commas_stays_one_option_value() -> None:
    text = "search-formats{formats=int8|float<2..5,0..6>|float<4,3,fn>,granularity=network}"
    (spec,) = split_pipeline(text)
    assert spec.options == (("formats", "int8|float<2..5,0..6>|float<4,3,fn>"), ("granularity", "network"))
    (pass_,) = parse_pipeline(text).passes
    assert pass_.options.formats == "int8|float<2..5,0..6>|float<4,3,fn>"
    assert format_pipeline(parse_pipeline(format_pipeline([pass_])).passes) == format_pipeline([pass_])


def test_whitespace_is_tolerated() -> None:
    manager = parse_pipeline("  fold-batchnorm ,\n calibrate { method = mse , bins = 64 } , insert-qdq ")
    assert names(manager) == ["fold-batchnorm", "calibrate", "insert-qdq"]
    assert manager.passes[1].options.method == "mse"
    assert manager.passes[1].options.bins == 64


def test_repr_of_a_pass_is_its_pipeline_text() -> None:
    (pass_,) = parse_pipeline("calibrate{method=entropy}").passes
    assert repr(pass_) == "calibrate{method=entropy}"


# --------------------------------------------------------------------------------------------
# typed options
# --------------------------------------------------------------------------------------------


def test_typed_options_are_converted() -> None:
    o = calibrate_options("calibrate{method=percentile,percentile=99.5,bins=512,batch-size=8}")
    assert o.method == "percentile"
    assert isinstance(o.percentile, float) and o.percentile == 99.5
    assert type(o.bins) is int and o.bins == 512
    assert type(o.batch_size) is int and o.batch_size == 8


def test_float_option_accepts_integer_and_exponent_text() -> None:
    assert calibrate_options("calibrate{percentile=99}").percentile == 99.0
    assert calibrate_options("calibrate{percentile=9.95e1}").percentile == pytest.approx(99.5)


def test_snake_case_option_name_is_accepted() -> None:
    assert calibrate_options("calibrate{batch_size=4}").batch_size == 4


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("off", False), ("TRUE", True)])
def test_bool_option(raw: str, expected: bool) -> None:
    (pass_,) = parse_pipeline(f"fold-batchnorm{{decompose-standalone={raw}}}").passes
    assert pass_.options.decompose_standalone is expected


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_literal_option_takes_each_choice(method: str) -> None:
    assert calibrate_options(f"calibrate{{method={method}}}").method == method


def test_defaults_are_omitted_when_printing() -> None:
    manager = parse_pipeline("calibrate{method=mse,percentile=99.99,bins=2048,batch-size=32},fold-batchnorm{decompose-standalone=true}")
    assert format_pipeline(manager.passes) == "calibrate,fold-batchnorm"


def test_non_defaults_print_in_field_order_and_bools_lowercase() -> None:
    manager = parse_pipeline("calibrate{bins=64,method=minmax},fold-batchnorm{decompose-standalone=off}")
    assert format_pipeline(manager.passes) == "calibrate{method=minmax,bins=64},fold-batchnorm{decompose-standalone=false}"


def test_format_pass_of_keyword_built_pass() -> None:
    pass_ = get_pass("calibrate")(method="entropy", bins=128)
    assert format_pass(pass_) == "calibrate{method=entropy,bins=128}"


# --------------------------------------------------------------------------------------------
# list form
# --------------------------------------------------------------------------------------------


def test_list_of_names_and_texts() -> None:
    manager = parse_pipeline(["infer-shapes", "calibrate{method=percentile}"])
    assert names(manager) == ["infer-shapes", "calibrate"]
    assert manager.passes[1].options.method == "percentile"
    assert format_pipeline(manager.passes) == "infer-shapes,calibrate{method=percentile}"


def test_list_item_may_hold_several_passes() -> None:
    manager = parse_pipeline(["infer-shapes,fold-constants", "insert-qdq"])
    assert names(manager) == ["infer-shapes", "fold-constants", "insert-qdq"]


def test_list_with_pass_instances_keeps_them() -> None:
    calibrate = get_pass("calibrate")(method="minmax")
    manager = parse_pipeline(["fold-batchnorm", calibrate, "insert-qdq"])
    assert names(manager) == ["fold-batchnorm", "calibrate", "insert-qdq"]
    assert manager.passes[1] is calibrate
    assert format_pipeline(manager.passes) == "fold-batchnorm,calibrate{method=minmax},insert-qdq"


def test_list_and_text_give_the_same_pipeline() -> None:
    text = "infer-shapes,calibrate{method=percentile,bins=64},insert-qdq"
    from_list = parse_pipeline(["infer-shapes", "calibrate{method=percentile,bins=64}", "insert-qdq"])
    assert format_pipeline(from_list.passes) == format_pipeline(parse_pipeline(text).passes) == text


def test_list_with_a_non_pass_item_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_pipeline(["infer-shapes", 42])  # type: ignore[list-item]


def test_nested_pass_manager_prints_flat() -> None:
    inner = parse_pipeline("infer-shapes,calibrate{method=percentile}")
    outer = parse_pipeline([inner, "insert-qdq"])
    assert isinstance(outer.passes[0], PassManager)
    assert format_pipeline(outer.passes) == "infer-shapes,calibrate{method=percentile},insert-qdq"


def test_split_pipeline_returns_specs() -> None:
    specs = split_pipeline("a,b{x=1,y=two},c")
    assert specs == [PassSpec("a"), PassSpec("b", (("x", "1"), ("y", "two"))), PassSpec("c")]


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def parse_error(text) -> QCError:
    with pytest.raises(QCError) as info:
        parse_pipeline(text)
    exc = info.value
    assert "\n" not in str(exc), "an error must fit on one line"
    return exc


def test_unknown_pass_lists_known_passes() -> None:
    exc = parse_error("fold-batchnorm,bogus-pass")
    assert exc.pass_name == "bogus-pass"
    assert "pass 'bogus-pass'" in str(exc)
    for known in all_passes():
        assert known in exc.message, f"known pass {known} not listed"


def test_unknown_pass_in_list_form() -> None:
    exc = parse_error(["infer-shapes", "bogus-pass"])
    assert exc.pass_name == "bogus-pass"


def test_unknown_option_lists_accepted_options() -> None:
    exc = parse_error("calibrate{methd=mse}")
    assert exc.pass_name == "calibrate"
    assert exc.option == "methd"
    for accepted in ("method", "percentile", "bins", "batch-size"):
        assert accepted in exc.message
    assert "pass 'calibrate'" in str(exc) and "option 'methd'" in str(exc)


def test_option_on_a_pass_without_options() -> None:
    exc = parse_error("infer-shapes{foo=1}")
    assert exc.pass_name == "infer-shapes"
    assert exc.option == "foo"
    assert "none" in exc.message


def test_bad_literal_lists_choices() -> None:
    exc = parse_error("calibrate{method=foo}")
    assert (exc.pass_name, exc.option) == ("calibrate", "method")
    assert "foo" in exc.message
    for choice in ("minmax", "percentile", "entropy", "mse"):
        assert choice in exc.message


def test_literal_is_case_sensitive() -> None:
    exc = parse_error("calibrate{method=MSE}")
    assert exc.option == "method"


def test_bad_bool() -> None:
    exc = parse_error("fold-batchnorm{decompose-standalone=maybe}")
    assert (exc.pass_name, exc.option) == ("fold-batchnorm", "decompose-standalone")
    assert "maybe" in exc.message and "true" in exc.message and "false" in exc.message


def test_bad_float() -> None:
    exc = parse_error("calibrate{percentile=abc}")
    assert (exc.pass_name, exc.option) == ("calibrate", "percentile")
    assert "abc" in exc.message


@pytest.mark.parametrize("raw", ["1.5", "lots", ""])
def test_bad_int(raw: str) -> None:
    exc = parse_error(f"calibrate{{bins={raw}}}")
    assert (exc.pass_name, exc.option) == ("calibrate", "bins")


def test_value_rejected_by_the_pass_names_the_pass() -> None:
    exc = parse_error("calibrate{percentile=10}")
    assert exc.pass_name == "calibrate"
    assert "percentile" in exc.message


def test_option_given_twice() -> None:
    exc = parse_error("calibrate{method=percentile,method=minmax}")
    assert (exc.pass_name, exc.option) == ("calibrate", "method")
    assert "twice" in exc.message


def test_option_given_twice_in_both_spellings() -> None:
    exc = parse_error("calibrate{batch-size=4,batch_size=8}")
    assert exc.pass_name == "calibrate"
    assert "twice" in exc.message


def test_unclosed_brace() -> None:
    exc = parse_error("calibrate{method=percentile")
    assert exc.option == "--pipeline"
    assert "calibrate" in exc.message and "'{'" in exc.message


def test_unmatched_closing_brace() -> None:
    exc = parse_error("calibrate}")
    assert exc.option == "--pipeline"
    assert "'}'" in exc.message


def test_extra_closing_brace_after_options() -> None:
    exc = parse_error("calibrate{method=percentile}},insert-qdq")
    assert exc.option == "--pipeline"


def test_nested_braces() -> None:
    exc = parse_error("calibrate{method={mse}}")
    assert exc.option == "--pipeline"


def test_option_without_value() -> None:
    exc = parse_error("calibrate{mse}")
    assert exc.option == "--pipeline"
    assert "mse" in exc.message


@pytest.mark.parametrize("text", ["", "   ", ",", " , ,\n"])
def test_empty_pipeline(text: str) -> None:
    exc = parse_error(text)
    assert exc.option == "--pipeline"
    assert "empty" in exc.message


def test_missing_name_before_options() -> None:
    exc = parse_error("{method=percentile}")
    assert exc.option == "--pipeline"


def test_missing_comma_after_options() -> None:
    exc = parse_error("calibrate{method=percentile} insert-qdq")
    assert exc.option == "--pipeline"
    assert "','" in exc.message


def test_missing_comma_between_names_is_an_error() -> None:
    parse_error("a b")
    exc = parse_error("fold-batchnorm insert-qdq")
    assert "fold-batchnorm" in str(exc)


def test_missing_comma_between_names_is_a_syntax_error() -> None:
    exc = parse_error("fold-batchnorm insert-qdq")
    assert exc.option == "--pipeline"
    assert "','" in exc.message
    assert exc.pass_name is None


def test_errors_are_qcerrors_not_other_exceptions() -> None:
    """Every bad text raises QCError (the CLI's one-line error), never KeyError/ValueError."""
    bad = ["calibrate{", "}", "{}", "calibrate{=1}", "calibrate{method}", "calibrate{bins=1e3}", "calibrate{bins=8}", "a{b=1}{c=2}"]
    for text in bad:
        with pytest.raises(QCError):
            parse_pipeline(text)


def test_pass_subclass_check() -> None:
    assert all(issubclass(cls, Pass) for cls in all_passes().values())


@pytest.mark.parametrize(("text", "message"), [
    ("cluster-weights{target-bits=nan}", "option 'target-bits': 'nan' is not a finite number"),
    ("calibrate{percentile=inf}", "option 'percentile': 'inf' is not a finite number"),
    ("calibrate{bins=1000000000000}", "'bins' must be in \\[16, 1048576\\]"),
])
def test_non_finite_and_unbounded_option_values_are_refused(text: str, message: str) -> None:
    with pytest.raises(QCError, match=message):
        parse_pipeline(text)
