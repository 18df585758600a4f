"""A JSON file that keeps an expensive analysis result across compiles of the same model and data.

Hessian traces (minutes) and measured quantization damage (a forward pass per layer and width) do
not change between compiles that differ only in a budget or a method: a sweep over budgets should
pay for them once. The file holds one result and the key it was computed for, a hash of the model
(graph and weights), the samples it read and its parameters; any difference recomputes and
overwrites it, so a stale file can never be read back as if it were current.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.data import DataSource
from qcompiler.ir import to_proto, write_file_atomically


#: Samples hashed per slice (bounds the memory `cache_key` reads at once).
_HASH_SAMPLES = 1024


def cache_key(model: ir.Model, data: DataSource | None, parameters: Mapping[str, Any]) -> str:
    """Hash of what a result depends on: the model, the samples ``data`` holds, and ``parameters``."""
    digest = hashlib.sha256(to_proto(model).SerializeToString(deterministic=True))
    if data is not None:
        for name in sorted(data.arrays):
            array = data.arrays[name]
            # In slices: a memory-mapped calibration file is hashed without reading it whole.
            for start in range(0, len(array), _HASH_SAMPLES):
                digest.update(np.ascontiguousarray(array[start : start + _HASH_SAMPLES]).tobytes())
        if data.labels is not None:
            digest.update(np.ascontiguousarray(data.labels).tobytes())
    digest.update(repr(sorted(parameters.items())).encode())
    return digest.hexdigest()


def read_cached(path: str | Path, key: str) -> dict[str, Any] | None:
    """The payload stored under ``key`` in ``path``; None when the file is missing, unreadable or stale."""
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("key") == key else None


def write_cached(path: str | Path, key: str, payload: Mapping[str, Any]) -> None:
    """Store ``payload`` under ``key`` in ``path`` (atomically: a reader never sees half a file)."""
    write_file_atomically(path, json.dumps({"key": key, **payload}, indent=1).encode())
