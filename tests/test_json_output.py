"""The JSON files qc writes for machines: each kind named and versioned, its shipped JSON Schema
consistent with that version and documented, non-finite floats written as strings, and a write that
fails leaving the previous file whole."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from qcompiler.json_output import SCHEMA_VERSIONS, dumps, schema, write_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", sorted(SCHEMA_VERSIONS))
def test_each_schema_is_valid_and_pins_its_version(kind: str) -> None:
    shipped = schema(kind)
    jsonschema.Draft202012Validator.check_schema(shipped)
    version = SCHEMA_VERSIONS[kind]
    assert shipped["properties"]["schema_version"] == {"const": version}
    assert shipped["properties"]["schema"] == {"const": f"qcompiler/{kind}"}
    assert shipped["$id"].endswith(f"/{kind}/{version}")
    # Every kind is documented with its version, beside the command that writes it.
    assert f"`qcompiler/{kind}` version {version}" in (ROOT / "docs" / "json-output.md").read_text()


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError, match="no JSON layout named 'nope'"):
        schema("nope")


def test_non_finite_floats_are_strings_and_the_header_comes_first() -> None:
    text = dumps("validate", {"model": "m.onnx", "values": [math.inf, -math.inf, math.nan, 1.5], "nested": {"x": (math.nan,)}})
    payload = json.loads(text)  # strict JSON: no NaN/Infinity tokens
    assert "NaN" not in text and "Infinity" not in text
    assert list(payload)[:2] == ["schema", "schema_version"]
    assert payload["values"] == ["inf", "-inf", "nan", 1.5] and payload["nested"] == {"x": ["nan"]}


def test_a_write_that_fails_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    write_json(path, "validate", {"model": "a"})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json(path, "validate", {"model": object()})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.json"]
