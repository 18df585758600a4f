"""Files a target needs beside the QDQ model (``emit = [...]`` in its description).

Each emitter reads the compiled model and the target and writes one file into the output folder;
the compiler calls them after writing ``model.onnx``, inside the same all-or-nothing folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import onnx_ir as ir

from qcompiler.qnn_encodings import write_qnn_encodings
from qcompiler.qonnx_export import write_qonnx_model
from qcompiler.targets.spec import TargetSpec

Emitter = Callable[[ir.Model, TargetSpec, Path, Mapping[str, int]], Path]

EMITTERS: dict[str, Emitter] = {
    "qnn-encodings": write_qnn_encodings,
    "qonnx-model": write_qonnx_model,
}


def emit_artifacts(model: ir.Model, target: TargetSpec, folder: Path, weight_bits: Mapping[str, int] | None = None) -> list[Path]:
    """Write every file ``target.emit`` names into ``folder``; return their paths."""
    return [EMITTERS[name](model, target, folder, weight_bits or {}) for name in target.emit]
