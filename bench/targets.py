"""Every built-in target on the CIFAR-10 ResNet-20 and ResNet-56, in one run.

    python bench/targets.py                      # full CIFAR-10 test set, both models
    python bench/targets.py --quick              # 2,000 test images, ResNet-20 only

For each (model, target): `qc compile` with the target's default pipeline (256 calibration images
from the training subset), `qc validate` of the output against the same target, top-1 accuracy on
the test set measured in onnxruntime, and the measured speedup beside the one the target's cost
table predicts. Then, per model, the latency check: `qc target measure ort-cpu --model MODEL`
times the model's own layers, and a compile with that table predicts its speedup; on ResNet-20 also
a latency-budgeted mixed-precision compile (float or int8 per layer under a budget of 1.3x the
all-int8 latency), predicted against measured.

Bars (the issue's): every output validates clean; int8 targets (8-bit integer weights and
activations) lose at most 0.5 points against float; the latency-budgeted mixed-precision compile's
predicted speedup, from the measured table, within 15 % of the measured one (the all-int8
predictions print as INFO). Targets that are not int8 (weight-only int4, FP8) print their figures as INFO.
Every row prints the exact commands that produced it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_ort import REPO, RESULTS, SHARED, Bars, _tail, cifar, exit_status, rel, shell_line  # noqa: E402

sys.path.insert(0, str(REPO))
from qcompiler.targets.spec import list_targets, load_target  # noqa: E402

QC = str(Path(sys.executable).parent / "qc")
MODELS = {"resnet20": SHARED / "models" / "cifar10_resnet20.onnx", "resnet56": SHARED / "models" / "cifar10_resnet56.onnx"}
CALIB = REPO / "models" / "cifar10_calib.npz"
INT8_DROP_MAX = 0.5
PREDICTION_ERROR_MAX = 0.15
LATENCY_RUNS = 200


@dataclass
class Row:
    model: str
    target: str
    commands: list[str]
    accuracy_float: float | None = None
    accuracy: float | None = None
    violations: int | None = None
    speedup: float | None = None
    predicted_speedup: float | None = None
    int8: bool = False
    error: str | None = None


def _run(argv: list[str], log: Path) -> int:
    with log.open("w") as fh:
        return subprocess.run(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode


def _is_int8(target: str) -> bool:
    path = REPO / target
    spec = load_target(str(path) if path.is_file() else target)
    width = spec.bits.default or spec.weights.bits
    integer = not (spec.activations.is_float8 or spec.weights.is_float8)
    return integer and spec.activations.quantize and spec.activations.bits == 8 and width == 8


def compile_and_validate(model: str, target: str, test: Path, out: Path, label: str | None = None, pipeline: str | None = None) -> Row:
    compile_argv = [QC, "compile", rel(MODELS[model]), "--target", target, "--calib", rel(CALIB), "--data", rel(test), "-o", rel(out), "--force", "--latency-runs", str(LATENCY_RUNS)]
    if pipeline is not None:
        compile_argv += ["--pipeline", pipeline]
    validate_argv = [QC, "validate", rel(out / "model.onnx"), "--target", target, "--json", rel(out / "validate.json")]
    row = Row(model, label or target, [shell_line(compile_argv), shell_line(validate_argv)], int8=_is_int8(target))
    out.parent.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"{out.name}.log"
    if _run(compile_argv, log) != 0:
        row.error = f"compile failed: {_tail(log)}"
        return row
    report = json.loads((out / "report.json").read_text())["verification"]
    row.accuracy_float, row.accuracy = report["accuracy_float"], report["accuracy_quantized"]
    latency = report.get("latency") or {}
    row.speedup, row.predicted_speedup = latency.get("speedup"), latency.get("predicted_speedup")
    code = _run(validate_argv, RESULTS / f"{out.name}.validate.log")
    if code == 2:
        row.error = f"validate could not read the model: {_tail(RESULTS / f'{out.name}.validate.log')}"
    else:
        row.violations = len(json.loads((out / "validate.json").read_text())["violations"])
    return row


def measured_table(model: str) -> tuple[Path, str]:
    table = RESULTS / f"tg_{model}_ort-cpu-measured.toml"
    argv = [QC, "target", "measure", "ort-cpu", "--model", rel(MODELS[model]), "-o", rel(table), "--force"]
    if _run(argv, RESULTS / f"{table.stem}.log") != 0:
        raise SystemExit(f"qc target measure failed: {_tail(RESULTS / f'{table.stem}.log')}")
    return table, shell_line(argv)


def float_or_int8(model: str, table: Path) -> Path:
    """The measured table, with float allowed beside int8: latency budgets then trade on ort-cpu
    (every narrower width runs in the same int8 kernels, so only float costs differently)."""
    path = RESULTS / f"tg_{model}_ort-cpu-float-or-int8.toml"
    path.write_text(f'extends = "{table.name}"\nname = "ort-cpu-float-or-int8"\n[bits]\nallowed = [8, 32]\n')
    return path


MIXED_PIPELINE = "infer-shapes,fold-constants,fold-batchnorm,hessian-trace,assign-precision{budget=latency=%s,pareto-points=0,measure-below=0},calibrate{method=mse},insert-qdq"
MIXED_BUDGET = 1.3


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def print_table(rows: list[Row]) -> None:
    print(f"\n{'model':<9} {'target':<22} {'float %':>8} {'quant %':>8} {'drop':>6} {'validate':>9} {'speedup':>8} {'predicted':>9}")
    for r in rows:
        if r.error:
            print(f"{r.model:<9} {r.target:<22} ERROR {r.error}")
        else:
            drop = 100 * (r.accuracy_float - r.accuracy)
            valid = "clean" if r.violations == 0 else f"{r.violations} viol."
            pred = "-" if r.predicted_speedup is None else f"{r.predicted_speedup:.2f}x"
            print(f"{r.model:<9} {r.target:<22} {_pct(r.accuracy_float):>8} {_pct(r.accuracy):>8} {drop:>6.2f} {valid:>9} {r.speedup:>7.2f}x {pred:>9}")
        for command in r.commands:
            print(f"    $ {command}")


def checks(rows: list[Row]) -> list[dict]:
    bars = Bars("model")
    print("\nBars:")
    for r in rows:
        who = f"{r.model}/{r.target}"
        if r.error:
            bars.add(who, "compiles", None, False, f"{r.error}")
            continue
        bars.add(who, "validate", r.violations, r.violations == 0, f"qc validate: {r.violations} violations (bar 0)")
        drop = 100 * (r.accuracy_float - r.accuracy)
        if r.int8:
            bars.add(who, "accuracy_drop_pts", drop, drop <= INT8_DROP_MAX, f"accuracy float - quantized = {drop:.2f} pts (bar <= {INT8_DROP_MAX}, int8)")
        else:
            bars.add(who, "accuracy_drop_pts", drop, None, f"accuracy float - quantized = {drop:.2f} pts (not int8: reported, no bar)", info=True)
        if r.target.endswith("(measured table)") and r.predicted_speedup is not None and r.speedup:
            # The bar is on latency-budgeted mixed precision; the all-int8 prediction is
            # reported beside it.
            err = r.predicted_speedup / r.speedup - 1
            budgeted = "latency-budget" in r.target
            text = f"predicted {r.predicted_speedup:.2f}x vs measured {r.speedup:.2f}x: {100 * err:+.1f} %" + (f" (bar within {100 * PREDICTION_ERROR_MAX:.0f} %)" if budgeted else " (all int8: reported, no bar)")
            bars.add(who, "latency_prediction", err, abs(err) <= PREDICTION_ERROR_MAX if budgeted else None, text, info=not budgeted)
    return bars.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None, help="comma-separated (default: resnet20,resnet56; --quick: resnet20)")
    parser.add_argument("--targets", default=",".join(list_targets()))
    parser.add_argument("--json", type=Path, default=RESULTS / "targets.json")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table and bars of an earlier run's --json file, compiling nothing")
    args = parser.parse_args()
    if args.from_json is not None:
        rows = [Row(**r) for r in json.loads(args.from_json.read_text())["rows"]]
        for r in rows:  # the int8 classification follows the current bars
            target = next((c.split("--target ")[1].split()[0] for c in r.commands if " compile " in c), r.target)
            r.int8 = _is_int8(target)
        print_table(rows)
        sys.exit(exit_status(checks(rows)))
    models = (args.models or ("resnet20" if args.quick else "resnet20,resnet56")).split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    count = 2000 if args.quick else None
    test = RESULTS / f"tg_cifar_test{'_2000' if count else ''}.npz"
    if not test.exists():
        np.savez(test, **cifar.make(SHARED / "data" / "cifar10_test.npz", count))
    rows = []
    for model in models:
        for target in args.targets.split(","):
            print(f"[{model}] {target}", flush=True)
            rows.append(compile_and_validate(model, target, test, RESULTS / f"tg_{model}_{target}"))
        print(f"[{model}] ort-cpu with its own measured cost table", flush=True)
        table, measure_command = measured_table(model)
        row = compile_and_validate(model, rel(table), test, RESULTS / f"tg_{model}_ort-cpu-measured", label="ort-cpu (measured table)")
        row.commands.insert(0, measure_command)
        rows.append(row)
        if model == "resnet20":  # ResNet-56's Hessian traces take half an hour on this machine
            print(f"[{model}] ort-cpu float-or-int8, latency budget {MIXED_BUDGET}", flush=True)
            mixed = float_or_int8(model, table)
            row = compile_and_validate(model, rel(mixed), test, RESULTS / f"tg_{model}_ort-cpu-latency-mixed", label="ort-cpu latency-budget mixed (measured table)", pipeline=MIXED_PIPELINE % MIXED_BUDGET)
            row.commands.insert(0, measure_command)
            rows.append(row)
    print_table(rows)
    results = checks(rows)
    args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "checks": results}, indent=2))
    print(f"\nwrote {rel(args.json)}")
    sys.exit(exit_status(results))


if __name__ == "__main__":
    main()
