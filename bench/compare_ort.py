"""qcompiler versus onnxruntime's quantize_static (and NNCF, when installed), measured in one run.

    python bench/compare_ort.py                 # full run: 10,000 test images, ~10-20 min on 2 cores
    python bench/compare_ort.py --quick         # smoke check: 1,000 test images, fewer latency runs
    python bench/compare_ort.py --models resnet20,resnet18 --calib-count 128

For each network (CIFAR-10 ResNet-20 and ResNet-56 from ../shared/models, and a ResNet-18-shaped
224x224 model with random weights built by bench/resnet18.py) every tool quantizes the same float
model with the same calibration samples, each in its own subprocess (compile time and peak RSS per
tool). The bench then measures every model the same way: top-1 accuracy on the CIFAR-10 test set,
SQNR of the logits against the float model, and batch-1 latency with identical onnxruntime session
options, all models of one network timed in one block-interleaved loop so that load drifts hit them
all (see `interleaved_latency` and `bench_options` for why blocks and why no intra-op spinning).
ResNet-18 has random weights and random-normal inputs: latency and logit SQNR only, no accuracy.

It ends with the pass/fail bars of qcompiler against onnxruntime's quantizer. Results also go to
``--json`` (default bench/results/compare_ort.json); quantized models and logs to bench/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler.runtime import session_options
from qcompiler.verify import interleaved_latency

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared"  # ../shared from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))
import resnet18  # noqa: E402  (bench/resnet18.py, next to this file)


def _load_make_cifar10_npz():
    """models/make_cifar10_npz.py holds the CIFAR-10 preprocessing; import it rather than copy it."""
    spec = importlib.util.spec_from_file_location("make_cifar10_npz", REPO / "models" / "make_cifar10_npz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cifar = _load_make_cifar10_npz()

CIFAR_MODELS = {"resnet20": "cifar10_resnet20.onnx", "resnet56": "cifar10_resnet56.onnx"}
ALL_MODELS = ("resnet20", "resnet56", "resnet18")
R18_CALIB_COUNT = 32  # random-normal calibration samples for ResNet-18 (no real data at 224x224)
R18_CALIB_SEED, R18_EVAL_SEED = 1, 2  # different seeds: SQNR is never measured on the calibration set
CALIB_SEED = 0

# Bars of qcompiler against onnxruntime's quantizer.
SPEEDUP_RATIO_MIN, SPEEDUP_RATIO_AIM = 1.0, 1.1
SQNR_GAIN_MIN_DB = 1.0
ACCURACY_DROP_MAX_PTS = 0.3
COMPILE_RATIO_MAX = 2.0


def rel(path: Path | str) -> str:
    """A path as the user types it from the repo root (../shared/... for the shared files)."""
    return os.path.relpath(Path(path).resolve(), REPO)


@dataclass
class Network:
    """One float model plus the data every tool and every measurement of it uses."""

    name: str
    float_model: Path
    float_command: str  # what produced the float model (or where it comes from)
    calib: Path
    eval_inputs: np.ndarray
    labels: np.ndarray | None  # None: no accuracy (ResNet-18 has random weights)
    latency_cycles: int  # timed runs per model = latency_cycles * latency_block
    latency_block: int
    eval_batch: int

    @property
    def latency_runs(self) -> int:
        return self.latency_cycles * self.latency_block


@dataclass
class Row:
    """One (network, tool) line of the table."""

    network: str
    tool: str
    command: str
    model: str | None = None
    compile_s: float | None = None  # inside the tool, after imports: load data + quantize + save
    wall_s: float | None = None  # the whole subprocess, Python start-up and imports included
    peak_rss_mib: float | None = None
    accuracy: float | None = None
    sqnr_db: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    error: str | None = None
    ort_optimized_ops: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


def prepare_networks(names: list[str], calib_count: int, quick: bool) -> list[Network]:
    """Write the calibration files under bench/results/ and load the evaluation data."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    networks = []
    cifar_names = [n for n in names if n in CIFAR_MODELS]
    if cifar_names:
        calib = RESULTS / "calib_cifar.npz"
        # A seeded random subset of the training images, never test images.
        np.savez_compressed(calib, **cifar.make(SHARED / "data" / "cifar10_train_subset.npz", calib_count, shuffle=True, seed=CALIB_SEED))
        test = cifar.make(SHARED / "data" / "cifar10_test.npz", 1000 if quick else None)
        for name in cifar_names:
            model = SHARED / "models" / CIFAR_MODELS[name]
            networks.append(
                Network(name, model, f"(float model {rel(model)})", calib, test["input"], test["labels"],
                        latency_cycles=5 if quick else 20, latency_block=10, eval_batch=500)
            )
    if "resnet18" in names:
        model = RESULTS / "resnet18.onnx"
        command = f"python bench/resnet18.py {rel(model)}"
        if not model.exists():  # cached: the export is seeded, so the file is the same every time
            print(f"exporting ResNet-18: {command}", flush=True)
            resnet18.export(model)
        calib = RESULTS / "calib_resnet18.npz"
        np.savez_compressed(calib, input=resnet18.random_inputs(R18_CALIB_COUNT, R18_CALIB_SEED))
        networks.append(
            Network("resnet18", model, command, calib, resnet18.random_inputs(8 if quick else 32, R18_EVAL_SEED), None,
                    latency_cycles=3 if quick else 12, latency_block=4 if quick else 5, eval_batch=8)
        )
    order = {n: i for i, n in enumerate(names)}
    return sorted(networks, key=lambda n: order[n.name])


# --------------------------------------------------------------------------------------------
# Compiling: one subprocess per tool, timed, with its own peak RSS
# --------------------------------------------------------------------------------------------


TIME = shutil.which("time", path="/usr/bin:/bin")  # GNU time: peak RSS of exactly one command


def run_measured(argv: list[str], log: Path) -> tuple[int, float, float | None]:
    """Run ``argv`` from the repo root; return (exit status, wall seconds, peak RSS in MiB or None).

    The peak RSS comes from /usr/bin/time, not from os.wait4 / getrusage(RUSAGE_CHILDREN) here:
    Python starts children with vfork, and at exec Linux carries the parent's RSS high-water mark
    into the child's maxrss, so every tool would be charged this bench's own memory (its test set
    and sessions). /usr/bin/time is a small process, so what it passes on is negligible.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    wrapped = [TIME, "-f", "%M", "-o", str(rss_file), *argv] if TIME else argv
    with log.open("wb") as fh:
        start = time.perf_counter()
        status = subprocess.run(wrapped, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    peak = None
    if rss_file.exists():
        # GNU time writes "Command exited with non-zero status N" before the number on failure.
        lines = rss_file.read_text().split()
        peak = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else None  # KiB -> MiB
    return status, wall, peak


def shell_line(argv: list[str]) -> str:
    """``argv`` as a line to paste into a shell: arguments holding pipeline braces are quoted."""
    return " ".join(f'"{a}"' if "{" in a else a for a in argv)


def _tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"


def compile_with(tool: str, net: Network) -> Row:
    """Quantize ``net`` with one tool in a subprocess; the printed command is exactly what ran."""
    out = RESULTS / f"{tool}_{net.name}"
    log = RESULTS / "logs" / f"{tool}_{net.name}.log"
    if tool == "qc":
        argv = ["qc", "compile", rel(net.float_model), "--target", "ort-cpu", "--calib", rel(net.calib), "-o", rel(out), "--force", "--no-verify"]
        # The venv's own qc, even if the caller's PATH lacks the venv.
        exe = [str(Path(sys.executable).parent / "qc")] + argv[1:]
    else:
        argv = ["python", "bench/quantize_other.py", tool, rel(net.float_model), rel(net.calib), rel(out)]
        exe = [sys.executable] + argv[1:]
        shutil.rmtree(out, ignore_errors=True)  # qc replaces its folder itself (--force)
    command = " ".join(argv)
    if tool == "ort":
        command += "   # = quant_pre_process(model, pre) + quantize_static(pre, out, reader, QDQ, per_channel, QUInt8/QInt8, MinMax)"
    elif tool == "nncf":
        command += "   # = nncf.quantize(onnx.load(model), nncf.Dataset(samples), subset_size=N)"
    row = Row(net.name, tool, command)
    print(f"[{net.name}] {tool}: {' '.join(argv)}", flush=True)
    status, row.wall_s, row.peak_rss_mib = run_measured(exe, log)
    if status != 0 or not (out / "model.onnx").exists():
        row.error = f"exit {status}: {_tail(log)}"
        print(f"    FAILED ({rel(log)}): {row.error}", flush=True)
        return row
    row.model = str(out / "model.onnx")
    if tool == "qc":
        row.compile_s = json.loads((out / "report.json").read_text())["compile_seconds"]
    else:
        row.compile_s = json.loads((out / "timing.json").read_text())["seconds"]
    return row


# --------------------------------------------------------------------------------------------
# Measuring: accuracy, SQNR, latency, what onnxruntime fused
# --------------------------------------------------------------------------------------------


# Untimed runs at the start of every block: the first run after switching models pays for cold
# caches and parked threads, which is not what a deployed model that runs continuously sees.


def bench_options(spinning: bool) -> ort.SessionOptions:
    """One set of options for every model: qcompiler's own (ORT_ENABLE_ALL, default intra-op threads).

    Intra-op spinning is off unless ``spinning``: on this 2-vCPU VM, spinning workers made the
    float models' latency swing 3-19 ms from trial to trial (multi-threaded float kernels suffer
    most), which inflated every int8 speedup. Without spinning, speedups repeat within ~5 %.
    """
    return session_options(optimize=True, spinning=spinning)


def make_session(model: str | Path, spinning: bool) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), sess_options=bench_options(spinning), providers=["CPUExecutionProvider"])


def logits_of(session: ort.InferenceSession, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"input": inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)])


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(sum f^2 / sum (f - q)^2) over all logits of all samples."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(np.sum(ref**2) / noise))


def ort_optimized_ops(model: str | Path, dump: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (after ORT_ENABLE_ALL): shows what it fused."""
    options = bench_options(spinning=False)
    options.optimized_model_filepath = str(dump)
    dump.parent.mkdir(parents=True, exist_ok=True)
    try:
        ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        return dict(Counter(n.op_type for n in onnx.load(str(dump)).graph.node).most_common())
    except Exception as exc:  # a diagnostic only: never fail the bench over it
        return {f"<could not dump: {type(exc).__name__}: {str(exc).strip()[:120]}>": 0}


def measure(net: Network, rows: list[Row], spinning: bool) -> None:
    """Fill accuracy, SQNR and latency for the float row and every quantized row of ``net``."""
    ok = [r for r in rows if r.model is not None]
    sessions = [make_session(r.model, spinning) for r in ok]
    print(f"[{net.name}] evaluating {len(ok)} models on {len(net.eval_inputs)} samples", flush=True)
    float_logits = None
    for row, session in zip(ok, sessions):
        logits = logits_of(session, net.eval_inputs, net.eval_batch)
        if row.tool == "float":
            float_logits = logits
        else:
            row.sqnr_db = sqnr_db(float_logits, logits)
        if net.labels is not None:
            row.accuracy = float(np.mean(logits.argmax(-1) == net.labels))
    print(f"[{net.name}] latency: batch 1, {net.latency_cycles} cycles x {net.latency_block} timed runs per model, block-interleaved", flush=True)
    ms, speedups = interleaved_latency(sessions, {"input": net.eval_inputs[:1]}, cycles=net.latency_cycles, block=net.latency_block)
    for row, t, x in zip(ok, ms, speedups):
        row.latency_ms, row.speedup = t, x
    for row in ok:
        row.ort_optimized_ops = ort_optimized_ops(row.model, RESULTS / "ort_optimized" / f"{row.tool}_{net.name}.onnx")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str) -> str:
    """``x`` formatted, or a right-aligned '-' of the same width when there is no value."""
    width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if x is None else format(x, fmt)


def print_table(networks: list[Network], rows: list[Row]) -> None:
    head = f"{'model':<9} {'tool':<6} {'compile s':>9} {'wall s':>7} {'peak MiB':>8} {'top-1 %':>7} {'Δ pts':>6} {'SQNR dB':>7} {'lat ms':>8} {'speedup':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for net in networks:
        base = next(r for r in rows if r.network == net.name and r.tool == "float")
        for r in (r for r in rows if r.network == net.name):
            if r.error:
                print(f"{r.network:<9} {r.tool:<6} FAILED: {r.error}")
            else:
                delta = None if r.accuracy is None or r.tool == "float" else 100 * (r.accuracy - base.accuracy)
                print(
                    f"{r.network:<9} {r.tool:<6} {_f(r.compile_s, '9.2f')} {_f(r.wall_s, '7.2f')} {_f(r.peak_rss_mib, '8.0f')} "
                    f"{_f(None if r.accuracy is None else 100 * r.accuracy, '7.2f')} {_f(delta, '+6.2f')} {_f(r.sqnr_db, '7.2f')} "
                    f"{_f(r.latency_ms, '8.3f')} {_f(r.speedup, '6.2f')}x"
                )
            print(f"    $ {r.command}")
        print()
    print(
        "compile s: inside the tool after imports (qc: report.json compile_seconds, --no-verify); wall s: the whole\n"
        "subprocess incl. Python start-up and imports; peak MiB: peak RSS of that subprocess (/usr/bin/time %M).\n"
        "SQNR: logits vs float over all evaluation samples. lat ms: median of all timed batch-1 runs; speedup: median\n"
        "over cycles of fp32 block median / model block median (same SessionOptions for all, see --spinning)."
    )


def print_fusion(rows: list[Row]) -> None:
    """What onnxruntime runs for each quantized model: leftover Q/DQ or float ops mean a missed fusion."""
    print("\nonnxruntime-optimized graphs (op counts after ORT_ENABLE_ALL; dumps in bench/results/ort_optimized/):")
    for r in rows:
        if r.ort_optimized_ops:
            ops = ", ".join(f"{k} {v}" for k, v in r.ort_optimized_ops.items())
            print(f"  {r.network:<9} {r.tool:<6} {ops}")


class Bars:
    """Records and prints a bench's bars, one PASS/FAIL/SKIP line each (``ok=None`` is SKIP).

    ``subject`` names the JSON key of what is checked ("network", "model").
    """

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.results: list[dict] = []

    def add(self, who: str, name: str, value: float | None, ok: bool | None, text: str, *, info: bool = False) -> None:
        """One bar; ``ok`` None: not measured (SKIP), or with ``info`` a figure printed beside the bars."""
        verdict = ("INFO" if info else "SKIP") if ok is None else "PASS" if ok else "FAIL"
        self.results.append({self.subject: who, "check": name, "value": value, "result": verdict})
        print(f"{verdict}  {who:<9} {text}")


def exit_status(results: list[dict]) -> int:
    """What a bench exits with: 1 when a bar failed, so scripts and CI can tell."""
    return 1 if any(c["result"] == "FAIL" for c in results) else 0


def checks(networks: list[Network], rows: list[Row]) -> list[dict]:
    """The bars of qcompiler against onnxruntime's quantizer, one PASS/FAIL line each."""
    bars = Bars("network")
    add = bars.add

    print("\nqcompiler vs onnxruntime quantize_static:")
    for net in networks:
        get = {r.tool: r for r in rows if r.network == net.name and not r.error}
        qc, ref, base = get.get("qc"), get.get("ort"), get.get("float")
        if qc is None or ref is None:
            add(net.name, "all", None, None, f"cannot compare: {'qc' if qc is None else 'ort'} failed")
            continue
        ratio = qc.speedup / ref.speedup
        aim = "aim 1.1 met" if ratio >= SPEEDUP_RATIO_AIM else "aim 1.1 not met"
        add(net.name, "speedup_ratio", ratio, ratio >= SPEEDUP_RATIO_MIN, f"speedup qc/ort = {qc.speedup:.2f}x / {ref.speedup:.2f}x = {ratio:.3f} (bar >= {SPEEDUP_RATIO_MIN}; {aim})")
        gain = qc.sqnr_db - ref.sqnr_db
        add(net.name, "sqnr_gain_db", gain, gain >= SQNR_GAIN_MIN_DB, f"SQNR qc - ort = {qc.sqnr_db:.2f} - {ref.sqnr_db:.2f} = {gain:+.2f} dB (bar >= +{SQNR_GAIN_MIN_DB:.0f} dB)")
        if net.labels is not None:
            drop = 100 * (base.accuracy - qc.accuracy)
            add(net.name, "accuracy_drop_pts", drop, drop <= ACCURACY_DROP_MAX_PTS,
                f"accuracy float - qc = {100 * base.accuracy:.2f} - {100 * qc.accuracy:.2f} = {drop:.2f} pts (bar <= {ACCURACY_DROP_MAX_PTS}; ort: {100 * (base.accuracy - ref.accuracy):.2f} pts)")
        cratio = qc.compile_s / ref.compile_s
        add(net.name, "compile_ratio", cratio, cratio <= COMPILE_RATIO_MAX, f"compile qc/ort = {qc.compile_s:.2f} s / {ref.compile_s:.2f} s = {cratio:.2f}x (bar <= {COMPILE_RATIO_MAX:.0f}x; wall {qc.wall_s:.2f} / {ref.wall_s:.2f} s)")
    return bars.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 test images and fewer latency runs (smoke check)")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    parser.add_argument("--calib-count", type=int, default=256, help="CIFAR-10 calibration images (seeded subset of the training images)")
    parser.add_argument("--spinning", action="store_true", help="keep onnxruntime's intra-op spinning on (its default; noisier here)")
    parser.add_argument("--json", type=Path, default=RESULTS / "compare_ort.json", help="write all results here")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if unknown := [n for n in names if n not in ALL_MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(ALL_MODELS)}")

    start = time.perf_counter()
    tools = ["qc", "ort"]
    if importlib.util.find_spec("nncf") is not None:
        tools.append("nncf")
        nncf_line = "NNCF: installed, included"
    else:
        nncf_line = "NNCF: not importable, skipped (pip install nncf to include it)"
    spin = "on (--spinning)" if args.spinning else "off"
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; intra-op spinning {spin}; {nncf_line}", flush=True)

    networks = prepare_networks(names, args.calib_count, args.quick)
    rows: list[Row] = []
    for net in networks:
        net_rows = [Row(net.name, "float", net.float_command, model=str(net.float_model))]
        net_rows += [compile_with(tool, net) for tool in tools]
        measure(net, net_rows, args.spinning)
        rows += net_rows

    print_table(networks, rows)
    print(nncf_line)
    print_fusion(rows)
    results = checks(networks, rows)
    total = time.perf_counter() - start
    print(f"\ntotal run time {total:.0f} s ({'quick' if args.quick else 'full'} mode)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "mode": "quick" if args.quick else "full",
            "onnxruntime": ort.__version__,
            "nncf": tools.count("nncf") > 0,
            "cpus": os.cpu_count(),
            "calib_count": args.calib_count,
            "spinning": args.spinning,
            "networks": {n.name: {"float_model": rel(n.float_model), "calib": rel(n.calib), "eval_samples": len(n.eval_inputs), "latency_runs": n.latency_runs, "latency_cycles": n.latency_cycles} for n in networks},
            "rows": [asdict(r) for r in rows],
            "checks": results,
            "total_seconds": total,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {rel(args.json)}")
    sys.exit(exit_status(results))


if __name__ == "__main__":
    main()
