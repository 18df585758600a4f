"""Run corpus cases through ``qc`` and classify what happened.

``python -m tests.corpus.run [NAME ...]`` builds the corpus in a temporary folder, runs every case
(or those named) and prints one line per case and the count of each class:

- ``correct``: an ``ok`` case whose output holds up, or an ``error``/``guard`` case that failed as
  it must (one clean line naming the culprit, nothing written, inputs unchanged);
- ``traceback``: an exception escaped to the user;
- ``hang``: no answer within the time limit;
- ``wrong``: anything else (a clean-looking run whose output is broken or silently inaccurate,
  an error line that names nothing, a written file after an error, a changed input).

Cases run in this process (``qcompiler.cli.main`` with its own argv) so the corpus takes a minute,
not the ten that a hundred interpreter start-ups would; output is captured at the file-descriptor
level so what onnxruntime prints from C++ counts as printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from tests.corpus.cases import CASES, Case, build

#: Seconds a case may take before it counts as a hang.
TIME_LIMIT_S = 180
#: The accuracy guard's default bound, dB (qcompiler.compiler.DEFAULT_MIN_SQNR_DB).
GUARD_DB = 20.0


@dataclass
class Outcome:
    name: str
    verdict: str  # correct | traceback | hang | wrong
    detail: str
    exit_code: int | None
    stderr: str
    seconds: float


def tree_digest(folder: Path, skip: str | None = None) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks by their target), except the ``skip`` subtree."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if skip and (rel == skip or rel.startswith(skip + "/")):
            continue
        if path.is_symlink():
            digests[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _captured():
    """Capture Python-level and file-descriptor-level stdout/stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}  # noqa: SIM115 - closed in finally
    py_out, py_err = io.StringIO(), io.StringIO()
    result = {"stdout": "", "stderr": ""}
    try:
        for fd, f in files.items():
            os.dup2(f.fileno(), fd)
        with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_err):
            yield result
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        texts = {}
        for fd, f in files.items():
            f.seek(0)
            texts[fd] = f.read().decode("utf-8", "replace")
            f.close()
        result["stdout"] = py_out.getvalue() + texts[1]
        result["stderr"] = py_err.getvalue() + texts[2]


def _invoke(argv: tuple[str, ...], cwd: Path) -> tuple[int | None, str, str, str | None]:
    """Run ``qc ARGV`` in ``cwd``: exit code, stdout, stderr, and the traceback if one escaped."""
    from qcompiler import cli

    escaped = None
    code: int | None = 0
    old_cwd, old_argv = Path.cwd(), sys.argv

    def on_alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    env = {"NO_COLOR": "1", "COLUMNS": "200"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        os.chdir(cwd)
        sys.argv = ["qc", *argv]
        with _captured() as streams, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            signal.alarm(TIME_LIMIT_S)
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except _Timeout:
                code = None
                escaped = "timeout"
            except BaseException:  # noqa: BLE001 - the point is to see what escapes
                code = 1
                escaped = traceback.format_exc()
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
        sys.argv = old_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, streams["stdout"], streams["stderr"], escaped


def _check_output(folder: Path, case: Case) -> str | None:
    """Why an ``ok`` case's output does not hold up, or None."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    out = folder / case.output
    model_path, report_path = out / "model.onnx", out / "report.json"
    if not model_path.is_file() or not report_path.is_file():
        return f"no model.onnx/report.json in {case.output}"
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        return f"ONNX checker: {str(exc).splitlines()[0]}"
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its warnings about the model are qc's to give, not this check's
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        calib = np.load(folder / case.calib) if (folder / case.calib).exists() else None
        feed = {}
        for spec in session.get_inputs():
            if calib is None:
                return f"no data to run input {spec.name}"
            key = spec.name if spec.name in calib.files else calib.files[0]
            # A fixed first dimension is the batch the model takes; otherwise two samples.
            feed[spec.name] = calib[key][: spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else 2]
        session.run(None, feed)
    except Exception as exc:  # noqa: BLE001
        return f"onnxruntime: {str(exc).splitlines()[0]}"
    code, _, stderr, escaped = _invoke(("validate", str(model_path), "--target", case.target), folder)
    if escaped or code != 0:
        return f"qc validate --target {case.target}: exit {code}: {(escaped or stderr).strip().splitlines()[-1] if (escaped or stderr).strip() else ''}"
    report = json.loads(report_path.read_text())
    verification = report.get("verification")
    if not verification or not verification.get("outputs"):
        return "report.json gives no output SQNR"
    sqnrs = [o["sqnr_db"] for o in verification["outputs"]]
    guard = report.get("guard") or {}
    low = [s for s in sqnrs if s != "inf" and not (isinstance(s, (int, float)) and (math.isinf(s) or s >= GUARD_DB))]
    if low and not guard.get("note"):
        return f"output SQNR {sqnrs} dB under {GUARD_DB} dB with no guard note"
    return None


def run_case(root: Path, name: str, case: Case) -> Outcome:
    """Run one built case in ``root/name`` and judge it against its expectation."""
    import time

    folder = root / name
    # An ok or guard case writes its output folder; an error case may write nothing at all.
    skip = None if case.expect == "error" else case.output
    before = tree_digest(folder, skip=skip)
    start = time.perf_counter()
    code, stdout, stderr, escaped = _invoke(case.argv, folder)
    seconds = time.perf_counter() - start

    def outcome(verdict: str, detail: str) -> Outcome:
        return Outcome(name, verdict, detail, code, stderr, seconds)

    if escaped == "timeout":
        return outcome("hang", f"no answer in {TIME_LIMIT_S} s")
    if escaped or "Traceback (most recent call last)" in stderr + stdout:
        text = escaped or stderr
        return outcome("traceback", text.strip().splitlines()[-1] if text.strip() else "traceback")
    after = tree_digest(folder, skip=skip)
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        return outcome("wrong", f"files changed or written: {sorted({k for k, _ in changed})}")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if case.expect == "error":
        if code != 2:
            return outcome("wrong", f"exit {code}, expected 2 (stderr: {' | '.join(lines[-2:])})")
        if len(lines) != 1 or not lines[0].startswith("error:"):
            return outcome("wrong", f"expected one 'error:' line, got {lines}")
        if case.culprit and case.culprit not in lines[0]:
            return outcome("wrong", f"error line does not name {case.culprit!r}: {lines[0]}")
        return outcome("correct", lines[0])
    if case.expect == "guard":
        if code != 1 or not any("accuracy guard" in line for line in lines):
            return outcome("wrong", f"exit {code}, expected the accuracy guard's exit 1")
        return outcome("correct", lines[-1])
    if code != 0:
        return outcome("wrong", f"exit {code}: {' | '.join(lines[-2:])}")
    problem = _check_output(folder, case)
    return outcome("wrong", problem) if problem else outcome("correct", "output checked")


def main(argv: list[str]) -> int:
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="qc-corpus-") as tmp:
        root = Path(tmp) / "corpus"
        cases = build(root, names)
        for name, case in cases.items():
            result = run_case(root, name, case)
            counts[result.verdict] = counts.get(result.verdict, 0) + 1
            print(f"{result.verdict:9s} {case.expect:5s} {result.seconds:6.1f}s  {name}: {result.detail}", flush=True)
    print("  ".join(f"{k}: {counts.get(k, 0)}" for k in ("correct", "traceback", "hang", "wrong")) + f"  (of {len(names)} cases)")
    return 0 if counts.get("correct", 0) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
