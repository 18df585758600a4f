"""Pass instruments: print-after, verify-each and dump-dir (timing is built into the pass manager)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from rich.console import Console

from qcompiler.errors import QCError
from qcompiler.external_weights import check_model
from qcompiler.ir import save_model, to_proto
from qcompiler.pass_manager import Instrument, Pass, PassContext, PassResult
from qcompiler.runtime import make_session


class PrintAfter(Instrument):
    """Print the model after each pass whose name is listed (``all`` for every pass)."""

    def __init__(self, pass_names: list[str], console: Console | None = None) -> None:
        self.pass_names = set(pass_names)
        self.console = console or Console()

    def after_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext, result: PassResult) -> None:
        if "all" in self.pass_names or pass_.name in self.pass_names:
            self.console.rule(f"after {pass_.name}")
            self.console.print(str(model.graph), markup=False, highlight=False)


_DUMP_NAME = re.compile(r"\d{2,}-.+\.onnx")


class DumpDir(Instrument):
    """Save the model after every pass as ``NN-<pass>.onnx`` in a folder."""

    def __init__(self, folder: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise QCError("exists and is not a folder", file=str(self.folder), option="--dump-dir")
        # Refused before any pass runs: a dump named like an input of the command would replace it.
        if self.folder.is_dir():
            here = self.folder.resolve()
            for given in inputs:
                if given is not None and Path(given).is_file() and Path(given).resolve().parent == here and _DUMP_NAME.fullmatch(Path(given).resolve().name):
                    raise QCError(f"holds an input of this command named like a dump ({given}): saving the passes there could replace it; choose another folder",
                                  file=str(self.folder), option="--dump-dir")
        self.count = 0

    def after_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext, result: PassResult) -> None:
        # Created on first use, so a run that fails before any pass leaves nothing behind.
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count += 1
        save_model(model, self.folder / f"{self.count:02d}-{pass_.name}.onnx")


class VerifyEach(Instrument):
    """After every pass: full ONNX checker, an onnxruntime run, and the pass's declared tolerance.

    A pass that declares ``tolerance`` (a numerics-preserving rewrite) must keep every output
    within ``tolerance * max(1, max |reference|)`` of the model before it.
    """

    def __init__(self, samples: int = 8) -> None:
        self.samples = samples
        self._before: list[np.ndarray] | None = None

    def _run(self, model: ir.Model, ctx: PassContext, pass_name: str) -> list[np.ndarray] | None:
        proto = to_proto(model)
        try:
            check_model(proto)
        except Exception as exc:
            raise QCError(f"model fails the ONNX checker after this pass: {str(exc).splitlines()[0]}", pass_name=pass_name) from None
        if ctx.data is None:
            return None
        session = make_session(proto, optimize=False, what=f"model after '{pass_name}'")
        feed = ctx.data.first_batch(self.samples)
        try:
            return session.run(None, feed)
        except Exception as exc:
            raise QCError(f"onnxruntime fails on the model after this pass: {str(exc).splitlines()[0]}", pass_name=pass_name) from None

    def before_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext) -> None:
        if pass_.tolerance is not None and ctx.data is not None:
            self._before = self._run(model, ctx, f"before {pass_.name}")
        else:
            self._before = None

    def after_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext, result: PassResult) -> None:
        after = self._run(model, ctx, pass_.name)
        if self._before is None or after is None or pass_.tolerance is None:
            return
        for ref, got in zip(self._before, after):
            bound = pass_.tolerance * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
            err = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
            if err > bound:
                raise QCError(f"changed the outputs by {err:.3g}, more than its tolerance {bound:.3g}", pass_name=pass_.name)
