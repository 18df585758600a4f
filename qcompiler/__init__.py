"""qcompiler: a quantization compiler for ONNX models.

>>> import qcompiler
>>> result = qcompiler.compile("models/cifar10_resnet20.onnx", target="ort-cpu",
...                            calibration="models/cifar10_calib.npz")      # doctest: +SKIP
>>> result.report.verification.outputs[0].sqnr_db                          # doctest: +SKIP
"""

from qcompiler.compiler import CompileResult, compile, verify
from qcompiler.errors import QCError
from qcompiler.pass_manager import Instrument, Pass, PassContext, PassManager, PassResult
from qcompiler.pipeline import format_pipeline, parse_pipeline
from qcompiler.registry import all_passes, get_pass, register_pass

__version__ = "0.1.0"
__all__ = [
    "CompileResult",
    "Instrument",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "QCError",
    "all_passes",
    "compile",
    "format_pipeline",
    "get_pass",
    "parse_pipeline",
    "register_pass",
    "verify",
]
