"""Mixed-precision weights (hessian-trace + assign-precision) against its baselines, in one run.

    python bench/mixed_precision.py                  # full: ResNet-20/56, 10,000 test images, 4 budgets
    python bench/mixed_precision.py --quick          # smoke check: ResNet-20, 2,000 test images, budgets 0.5/0.6
    python bench/mixed_precision.py --models resnet20 --json /tmp/mp.json

For each CIFAR-10 ResNet (../shared/models) and each size budget (a fraction of the int8 weight
bytes), every method of `assign-precision` (ilp, greedy, uniform, random) picks per-layer weight
widths from the ort-cpu target's `[bits]`; `qc compile` then calibrates, inserts Q/DQ and verifies on
the test set. One more row per model is the default uniform 8-bit pipeline, the reference. Every
compile is a `qc` subprocess, and every row of the table prints the exact command that produced it.

Data: 5,000 seeded random *training* images (never test images) for calibration; the Hessian
traces use the first 1,000 of them (hessian-trace's default), the Spearman check all 5,000 (with
fewer, the first-order noise of the subset swamps the loss changes it ranks); accuracy and SQNR
are measured by qc on the test set (`--data`). The Hessian traces of a model are
computed once, by its first row, and cached (`hessian-trace{cache=...}`): every method then weighs
by the very same traces, and the first row's pass time is the real trace time. The measured
damage at widths below 4 bits (`assign-precision{measure-below}`) is cached the same way
(`measure-cache=...`).

It ends with the issue's PASS/FAIL bars (ILP at budget 0.6 within 0.5 points of float and at least
as accurate as every baseline there; the other budgets' comparisons are printed as INFO lines; Spearman rank correlation of the Hessian estimate
with the measured loss increase >= 0.6; traces of ResNet-20 on 1,000 images within 60 s; the ILP
on 100 layers x 5 widths within 1 s), and HAWQ-V3's published figures for orientation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Shared helpers of the other bench: paths, the CIFAR-10 preprocessing module, log tail, formatting.
from compare_ort import RESULTS, SHARED, Bars, _f, _tail, cifar, exit_status, rel, shell_line  # noqa: E402

MODELS = {"resnet20": "cifar10_resnet20.onnx", "resnet56": "cifar10_resnet56.onnx"}
BUDGETS = (0.35, 0.5, 0.6, 0.75)
QUICK_BUDGETS = (0.5, 0.6)
METHODS = ("ilp", "greedy", "uniform", "random")
TRAIN_COUNT, TRACE_COUNT, QUICK_TEST_COUNT, TRAIN_SEED = 5000, 1000, 2000, 0

# The issue's bars.
ILP_DROP_MAX_PTS = 0.5  # at budget 0.6
ILP_DROP_BUDGET = 0.6
SPEARMAN_MIN = 0.6
#: The losses the Spearman check measures each layer's 4-bit damage with. The bar reads ``kl``
#: (the network's outputs against the float ones): at a trained minimum it has the same
#: second-order term as cross-entropy and no first-order one, whose sampling noise on 5,000 images
#: is as large as ResNet-56's per-layer changes. ``traces`` (cross-entropy here) is printed beside.
CHECK_LOSSES = ("kl", "traces")
TRACE_SECONDS_MAX = 60.0  # ResNet-20, 1,000 images
ILP_SECONDS_MAX = 1.0  # 100 layers x 5 widths

# HAWQ-V3 (Yao et al. 2021), ResNet-18 on ImageNet, as published; nothing here reproduces these.
HAWQ_V3_PUBLISHED = (("W8A8", "71.56 %", ""), ("mixed precision", "70.22 %", "6.7 MB"), ("W4A4", "68.45 %", ""))

TRAIN_NPZ = RESULTS / f"mp_train{TRAIN_COUNT}.npz"
TEST_NPZ = RESULTS / "mp_test.npz"
QC = str(Path(sys.executable).parent / "qc")  # the venv's own qc, even if PATH lacks the venv


@dataclass
class Row:
    """One compile: a (model, budget, method) cell, the 8-bit reference, or the Spearman check."""

    model: str
    budget: float | None  # None: the uniform 8-bit reference (default pipeline)
    method: str
    command: str
    average_bits: float | None = None
    weight_bytes: int | None = None  # logical: sum of parameters x bits / 8 (all widths are stored as int8)
    total_sensitivity: float | None = None
    accuracy_float: float | None = None
    accuracy: float | None = None
    sqnr_db: float | None = None
    trace_seconds: float | None = None  # hessian-trace pass time (real only on the model's first row)
    trace_cached: bool | None = None
    trace_probes: int | None = None
    trace_converged: bool | None = None
    spearman: float | None = None
    compile_s: float | None = None
    wall_s: float | None = None
    error: str | None = None

    @property
    def delta_pts(self) -> float | None:
        if self.accuracy is None or self.accuracy_float is None:
            return None
        return 100 * (self.accuracy - self.accuracy_float)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def prepare_data(quick: bool) -> int:
    """Write the training (calibration + Hessian) and test files; return the number of test images.

    Plain np.savez, not compressed: qcompiler memory-maps uncompressed .npz arrays. The test file is
    rewritten every run because --quick and full runs want different counts under the same name.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not TRAIN_NPZ.exists():  # seeded, so the same file every time
        np.savez(TRAIN_NPZ, **cifar.make(SHARED / "data" / "cifar10_train_subset.npz", TRAIN_COUNT, shuffle=True, seed=TRAIN_SEED))
    test = cifar.make(SHARED / "data" / "cifar10_test.npz", QUICK_TEST_COUNT if quick else None)
    np.savez(TEST_NPZ, **test)
    return len(test["labels"])


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------


def pipeline(model: str, assign: str) -> str:
    traces, damage = rel(RESULTS / f"mp_{model}_traces.json"), rel(RESULTS / f"mp_{model}_damage.json")
    return f"infer-shapes,fold-constants,fold-batchnorm,hessian-trace{{cache={traces}}},assign-precision{{{assign},measure-cache={damage}}},calibrate,insert-qdq"


def compile_row(model: str, budget: float | None, method: str, assign: str | None, out_name: str) -> Row:
    """Run one `qc compile` (from the repo root) and read its report.json into a Row."""
    out = RESULTS / out_name
    log = RESULTS / "logs" / f"{out_name}.log"
    argv = ["qc", "compile", rel(SHARED / "models" / MODELS[model]), "--target", "ort-cpu", "--calib", rel(TRAIN_NPZ),
            "--data", rel(TEST_NPZ), "-o", rel(out), "--force", "--latency-runs", "0"]
    if assign is not None:  # None: the target's default pipeline (uniform 8-bit)
        argv += ["--pipeline", pipeline(model, assign)]
    command = shell_line(argv)
    row = Row(model, budget, method, command)
    print(f"[{model}] {method} {'' if budget is None else budget}: {command}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("wb") as fh:
        status = subprocess.run([QC, *argv[1:]], cwd=RESULTS.parents[1], stdout=fh, stderr=fh).returncode
    row.wall_s = time.perf_counter() - start
    report_path = out / "report.json"
    if status != 0 or not report_path.exists():
        row.error = f"exit {status}: {_tail(log)}"
        print(f"    FAILED ({rel(log)}): {row.error}", flush=True)
        return row
    report = json.loads(report_path.read_text())
    row.compile_s = report.get("compile_seconds")
    v = report.get("verification") or {}
    row.accuracy_float, row.accuracy = v.get("accuracy_float"), v.get("accuracy_quantized")
    sqnr = (v.get("outputs") or [{}])[0].get("sqnr_db")
    row.sqnr_db = float(sqnr) if sqnr is not None else None  # report.json writes inf as "inf"
    for p in report.get("passes", []):
        if p["name"] == "hessian-trace":
            row.trace_seconds = p["seconds"]
            row.trace_probes, row.trace_converged = p["stats"].get("probes"), p["stats"].get("converged")
        elif p["name"] == "assign-precision":
            s = p["stats"]
            row.average_bits, row.weight_bytes, row.total_sensitivity = s.get("average_bits"), s.get("weight_bytes"), s.get("total_sensitivity")
            row.spearman = (s.get("check") or {}).get("spearman")
    if budget is None:  # the reference: every weight at 8 bits
        row.average_bits = 8.0
    print(f"    top-1 {_f(None if row.accuracy is None else 100 * row.accuracy, '.2f')} %, wall {row.wall_s:.1f} s", flush=True)
    return row


def int8_weight_bytes(rows: list[Row], model: str) -> int | None:
    """Logical int8 weight bytes of a model (one byte per quantized weight), from any budgeted row.

    budget_bytes = budget x int8 bytes, but weight_bytes is what was used; the hessian-trace stats
    list every weight's parameter count, so read them back from a report instead of guessing.
    """
    for r in rows:
        if r.model == model and r.budget is not None and not r.error:
            report = json.loads((RESULTS / f"mp_{model}_{r.budget}_{r.method}" / "report.json").read_text())
            traces = next(p["stats"]["traces"] for p in report["passes"] if p["name"] == "hessian-trace")
            return int(sum(t["parameters"] for t in traces.values()))
    return None


def run_model(model: str, budgets: tuple[float, ...], reuse_traces: bool) -> tuple[list[Row], list[Row]]:
    """All budget x method rows plus the 8-bit reference of one model, and its Spearman checks."""
    cache = RESULTS / f"mp_{model}_traces.json"
    cached_before = cache.exists() and reuse_traces
    if not reuse_traces:
        # Start without the cache so the first row times the real trace computation.
        cache.unlink(missing_ok=True)
        (RESULTS / f"mp_{model}_damage.json").unlink(missing_ok=True)
    rows = [compile_row(model, None, "int8", None, f"mp_{model}_int8")]
    first = True
    for budget in budgets:
        for method in METHODS:
            row = compile_row(model, budget, method, f"budget=size={budget},method={method},pareto-points=0", f"mp_{model}_{budget}_{method}")
            row.trace_cached = cached_before or not first
            first = False
            rows.append(row)
    rows[0].weight_bytes = int8_weight_bytes(rows, model)
    checks = []
    for loss in CHECK_LOSSES:
        check = compile_row(model, ILP_DROP_BUDGET, f"check:{loss}", f"budget=size={ILP_DROP_BUDGET},check-bits=4,check-samples={TRAIN_COUNT},check-loss={loss},pareto-points=0", f"mp_{model}_spearman_{loss}")
        check.trace_cached = True
        checks.append(check)
    return rows, checks


# --------------------------------------------------------------------------------------------
# ILP timing (in-process)
# --------------------------------------------------------------------------------------------


def time_ilp(layers: int = 100, bits: tuple[int, ...] = (2, 3, 4, 6, 8), seed: int = 0) -> float:
    """Seconds for solve_ilp on a random problem of the issue's size.

    Sizes are uniform in 1e3..1e5 parameters; omega is random positive, sorted so that wider widths
    are less sensitive (as real sensitivities are; unsorted, most choices are trivially dominated).
    Budget: half of all layers at the widest width.
    """
    from qcompiler.precision_ilp import solve_ilp

    rng = np.random.default_rng(seed)
    sizes = rng.uniform(1e3, 1e5, layers).round()
    omega = -np.sort(-rng.uniform(1e-6, 1.0, (layers, len(bits))), axis=1)  # descending along widths
    budget = 0.5 * sizes.sum() * max(bits)
    cost = sizes[:, None] * np.asarray(bits, dtype=np.float64)[None, :]  # the size resource, in weight bits
    start = time.perf_counter()
    solve_ilp(omega, cost, budget)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_table(rows: list[Row], spearman_rows: list[Row]) -> None:
    head = f"{'model':<9} {'budget':>6} {'method':<8} {'avg bits':>8} {'weight KB':>9} {'total sens.':>11} {'top-1 %':>7} {'Δ pts':>6} {'SQNR dB':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for model in dict.fromkeys(r.model for r in rows):
        for r in (r for r in rows if r.model == model):
            budget = "int8" if r.budget is None else f"{r.budget:.2f}"
            if r.error:
                print(f"{r.model:<9} {budget:>6} {r.method:<8} FAILED: {r.error}")
            else:
                print(
                    f"{r.model:<9} {budget:>6} {r.method:<8} {_f(r.average_bits, '8.3f')} "
                    f"{_f(None if r.weight_bytes is None else r.weight_bytes / 1024, '9.1f')} {_f(r.total_sensitivity, '11.4g')} "
                    f"{_f(None if r.accuracy is None else 100 * r.accuracy, '7.2f')} {_f(r.delta_pts, '+6.2f')} {_f(r.sqnr_db, '7.2f')}"
                )
            print(f"    $ {r.command}")
        float_acc = next((r.accuracy_float for r in rows if r.model == model and r.accuracy_float is not None), None)
        print(f"{model} float top-1: {_f(None if float_acc is None else 100 * float_acc, '.2f')} %\n")
    print(
        "weight KB: logical weight bytes / 1024 (sum of parameters x bits / 8; every width is stored as int8).\n"
        "total sens.: sum over layers of the Hessian-estimated loss increase Omega_l(b_l) at the chosen widths.\n"
        "int8 row: the target's default pipeline (uniform 8-bit, no assign-precision). Δ pts: vs the float model, same images."
    )


def checks(rows: list[Row], spearman_rows: list[Row], trace_s: float | None, ilp_s: float) -> list[dict]:
    """The issue's bars, one PASS/FAIL line each."""
    bars = Bars("model")
    add = bars.add

    print("\nbars:")
    for model in dict.fromkeys(r.model for r in rows):
        get = {(r.budget, r.method): r for r in rows if r.model == model and not r.error and r.accuracy is not None}
        for budget in sorted({r.budget for r in rows if r.model == model and r.budget is not None}):
            ilp = get.get((budget, "ilp"))
            if ilp is None:
                add(model, f"ilp@{budget}", None, None, f"budget {budget}: ILP row failed, no comparison")
                continue
            if budget == ILP_DROP_BUDGET:
                drop = -ilp.delta_pts
                add(model, f"ilp_drop@{budget}", drop, drop <= ILP_DROP_MAX_PTS,
                    f"budget {budget}: float - ILP = {100 * ilp.accuracy_float:.2f} - {100 * ilp.accuracy:.2f} = {drop:.2f} pts (bar <= {ILP_DROP_MAX_PTS})")
            for other in ("uniform", "greedy", "random"):
                base = get.get((budget, other))
                if base is None:
                    add(model, f"ilp>={other}@{budget}", None, None, f"budget {budget}: {other} row failed, no comparison")
                    continue
                diff = 100 * (ilp.accuracy - base.accuracy)
                # The issue's bar is at 0.6x; the other budgets are its table, printed beside.
                barred = budget == ILP_DROP_BUDGET
                add(model, f"ilp>={other}@{budget}", diff, (diff >= 0) if barred else None,
                    f"budget {budget}: ILP {100 * ilp.accuracy:.2f} % {'>=' if barred else 'vs'} {other} {100 * base.accuracy:.2f} % ({diff:+.2f} pts){'' if barred else ' (no bar)'}",
                    info=not barred)
    for r in spearman_rows:
        loss = r.method.partition(":")[2] or "traces"  # "ilp+check" rows of older runs measured the traces' loss
        what = "KL of the outputs from the float ones" if loss == "kl" else "the traces' loss (cross-entropy with labels)"
        if r.spearman is None:
            add(r.model, f"spearman_{loss}", None, False if loss == "kl" else None, f"Spearman (check-bits=4, {what}): not in report ({r.error or 'no check stats'})")
        elif loss == "kl":
            add(r.model, "spearman_kl", r.spearman, r.spearman >= SPEARMAN_MIN,
                f"Spearman(Hessian estimate, measured increase of the {what} at 4 bits) = {r.spearman:.3f} (bar >= {SPEARMAN_MIN})")
        else:
            add(r.model, f"spearman_{loss}", r.spearman, None, f"Spearman(Hessian estimate, measured increase of {what} at 4 bits) = {r.spearman:.3f} (no bar)", info=True)
        print(f"    $ {r.command}")
    if trace_s is None:
        add("resnet20", "trace_seconds", None, None, "Hessian traces: no uncached ResNet-20 row in this run (--reuse-traces or not selected)")
    else:
        add("resnet20", "trace_seconds", trace_s, trace_s <= TRACE_SECONDS_MAX,
            f"Hessian traces, {TRACE_COUNT} images: {trace_s:.1f} s (bar <= {TRACE_SECONDS_MAX:.0f} s; hessian-trace pass time of the first, uncached row)")
    add("-", "ilp_seconds", ilp_s, ilp_s <= ILP_SECONDS_MAX, f"solve_ilp, 100 layers x 5 widths, in-process: {ilp_s:.3f} s (bar <= {ILP_SECONDS_MAX:.0f} s)")
    return bars.results


def print_published() -> None:
    print("\npublished (HAWQ-V3, ResNet-18 ImageNet), not measured here:")
    for name, acc, size in HAWQ_V3_PUBLISHED:
        print(f"  {name:<16} top-1 {acc}{'  at ' + size if size else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TEST_COUNT:,} test images, resnet20 only, budgets {QUICK_BUDGETS}")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)} (default: all; --quick: resnet20)")
    parser.add_argument("--reuse-traces", action="store_true", help="keep cached Hessian traces and measured damage from an earlier run (the trace time is then not measured)")
    parser.add_argument("--json", type=Path, default=RESULTS / "mixed_precision.json", help="write all rows and checks here")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table and bars of an earlier run's --json file, compiling nothing")
    args = parser.parse_args()
    if args.from_json:
        stored = json.loads(args.from_json.read_text())
        rows = [Row(**{k: v for k, v in r.items() if k != "delta_pts"}) for r in stored["rows"]]
        spearman_rows = [Row(**r) for r in stored["spearman"]]
        print_table(rows, spearman_rows)
        results = checks(rows, spearman_rows, stored["trace_seconds_resnet20"], stored["ilp_seconds"])
        print_published()
        sys.exit(exit_status(results))
    names = [n.strip() for n in (args.models or ("resnet20" if args.quick else ",".join(MODELS))).split(",") if n.strip()]
    if unknown := [n for n in names if n not in MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(MODELS)}")
    budgets = QUICK_BUDGETS if args.quick else BUDGETS

    start = time.perf_counter()
    test_count = prepare_data(args.quick)
    print(f"data: {rel(TRAIN_NPZ)} ({TRAIN_COUNT} seeded random training images: calibration and the Spearman check, the first {TRACE_COUNT} Hessians), "
          f"{rel(TEST_NPZ)} ({test_count} test images, evaluation); {os.cpu_count()} CPUs", flush=True)
    rows: list[Row] = []
    spearman_rows: list[Row] = []
    for model in names:
        model_rows, model_checks = run_model(model, budgets, args.reuse_traces)
        rows += model_rows
        spearman_rows += model_checks

    # The uncached first row's hessian-trace pass time is the real trace time.
    first = next((r for r in rows if r.model == "resnet20" and r.budget is not None and not r.trace_cached and r.trace_seconds is not None), None)
    trace_s = first.trace_seconds if first else None
    ilp_s = time_ilp()

    print_table(rows, spearman_rows)
    for r in rows:
        if r.budget is not None and not r.trace_cached and r.trace_seconds is not None:
            print(f"hessian-trace {r.model}: {r.trace_seconds:.1f} s, {r.trace_probes} probes, converged {r.trace_converged} ({TRACE_COUNT} images, first row)")
    results = checks(rows, spearman_rows, trace_s, ilp_s)
    print_published()
    total = time.perf_counter() - start
    print(f"\ntotal run time {total:.0f} s ({'quick' if args.quick else 'full'} mode)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "mode": "quick" if args.quick else "full",
            "train": rel(TRAIN_NPZ), "train_count": TRAIN_COUNT, "test": rel(TEST_NPZ), "test_count": test_count,
            "budgets": list(budgets), "methods": list(METHODS),
            "rows": [asdict(r) | {"delta_pts": r.delta_pts} for r in rows],
            "spearman": [asdict(r) for r in spearman_rows],
            "trace_seconds_resnet20": trace_s, "ilp_seconds": ilp_s,
            "checks": results,
            "published_hawq_v3_resnet18_imagenet": [dict(zip(("config", "top1", "size"), p)) for p in HAWQ_V3_PUBLISHED],
            "total_seconds": total,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {rel(args.json)}")
    sys.exit(exit_status(results))


if __name__ == "__main__":
    main()
