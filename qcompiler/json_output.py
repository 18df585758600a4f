"""The JSON files qc writes for machines: one named, versioned layout per kind, written atomically.

Every file carries ``schema`` (``qcompiler/<kind>``) and ``schema_version``; the layout of each kind
is a JSON Schema shipped with the package (``qcompiler/schemas/<kind>.schema.json``) and described in
``docs/json-output.md``. A change a reader could trip on (a key removed, renamed or retyped) bumps
the kind's version; the test suite checks every command's output against its schema.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from typing import Any

#: Layout version of each kind of JSON file. Bump on any change, and update its schema file.
SCHEMA_VERSIONS: dict[str, int] = {
    "report": 4,  # qc compile's report.json, qc search's report.json, qc verify --json
    "validate": 1,  # qc validate --json
    "cost": 1,  # qc cost --json
    "layer-speed": 1,  # qc target measure --per-layer: OUTPUT.layers.json
}


def stamp(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` headed by its schema name and version (non-finite floats as strings: JSON has none)."""
    return {"schema": f"qcompiler/{kind}", "schema_version": SCHEMA_VERSIONS[kind], **finite(payload)}


def dumps(kind: str, payload: dict[str, Any]) -> str:
    """The text of a ``kind`` file holding ``payload``."""
    return json.dumps(stamp(kind, payload), indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, kind: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as a ``kind`` file, atomically: a reader never sees half a file."""
    from qcompiler.ir import write_file_atomically

    write_file_atomically(path, dumps(kind, payload).encode())


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a ``kind`` file, as shipped in the package."""
    if kind not in SCHEMA_VERSIONS:
        raise KeyError(f"no JSON layout named {kind!r}; known: {', '.join(SCHEMA_VERSIONS)}")
    return json.loads(resources.files("qcompiler").joinpath("schemas", f"{kind}.schema.json").read_text())


def finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as the strings "inf", "-inf" and "nan" so the file stays valid."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
