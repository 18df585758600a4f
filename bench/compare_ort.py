"""qcompiler versus onnxruntime's quantize_static (with and without reduce_range) and NNCF, in one run.

    python bench/compare_ort.py                 # full: all four networks, 10,000 CIFAR-10 test images
    python bench/compare_ort.py --quick         # smoke check: ResNet-20, ResNet-18, MobileNet; fewer images and runs
    python bench/compare_ort.py --models resnet20,mobilenet --calib-count 128 --json /tmp/out.json
    python bench/compare_ort.py --from-json bench/results/compare_ort.json   # re-print a run's table and bars

Networks: CIFAR-10 ResNet-20 and ResNet-56 (../shared/models, pretrained), a ResNet-18-shaped 224x224
model (bench/resnet18.py) and a MobileNetV2-style 224x224 model (bench/mobilenet.py: depthwise
convolutions, ReLU6 as Clip(0, 6), BatchNormalization kept), both with seeded random weights.

Tools, each quantizing the same float model with the same calibration samples in its own subprocess
(compile time and peak RSS per tool): ``qc compile --target ort-cpu``; onnxruntime's quantize_static
(QDQ, per-channel, u8s8, MinMax) with its defaults (``ort``) and with ``reduce_range=True`` (``ort-rr``,
7-bit weights: onnxruntime's remedy for the int16 saturation of u8s8 kernels on CPUs without VNNI);
NNCF's ``nncf.quantize`` when it is importable.

Every figure is measured by this bench, the same way for every model, never taken from a tool's own
report (qc runs with --no-verify):
- top-1 and logit SQNR *as the user runs the model*: onnxruntime with ORT_ENABLE_ALL (its integer
  kernels) on held-out data: CIFAR-10 test images (never the calibration images, which come from the
  training split), or a different seed of random inputs for ResNet-18. For the random-weight networks
  top-1 means agreement with the float model's top-1.
- the SQNR *as simulated*: the same models with ORT_ENABLE_BASIC, where Q/DQ pairs stay unfused and
  run in float, so the gap between the two columns is what the integer kernels change.
- batch-1 latency, block-interleaved (all models of a network timed in one loop, so load drifts hit
  them all); speedups are medians over cycles of paired per-cycle ratios, against fp32 and against
  onnxruntime's quantizer.

It ends with the PASS/FAIL bars (exit status 1 when one fails). The CPU (model, ISA flags) and the
onnxruntime version are printed above the table and stored in ``--json`` (default
bench/results/compare_ort.json); quantized models and logs go to bench/results/.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler.cpu import ISAS, detect_cpu
from qcompiler.runtime import session_options

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared"  # ../shared from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet  # noqa: E402  (bench/mobilenet.py, next to this file)
import resnet18  # noqa: E402  (bench/resnet18.py, next to this file)


def _load_make_cifar10_npz():
    """models/make_cifar10_npz.py holds the CIFAR-10 preprocessing; import it rather than copy it."""
    spec = importlib.util.spec_from_file_location("make_cifar10_npz", REPO / "models" / "make_cifar10_npz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cifar = _load_make_cifar10_npz()

CIFAR_MODELS = {"resnet20": "cifar10_resnet20.onnx", "resnet56": "cifar10_resnet56.onnx"}
ALL_MODELS = ("resnet20", "resnet56", "resnet18", "mobilenet")
QUICK_MODELS = ("resnet20", "resnet18", "mobilenet")
R18_CALIB_COUNT = 32  # random-normal calibration samples for ResNet-18 (no real data at 224x224)
R18_CALIB_SEED, R18_EVAL_SEED = 1, 2  # different seeds: SQNR is never measured on the calibration set
CALIB_SEED = 0
MB_CALIB_COUNT = 128  # CIFAR-10 training images, upsampled, for the MobileNet
MB_EVAL_COUNT, MB_EVAL_COUNT_QUICK = 1000, 300  # CIFAR-10 test images, upsampled
MB_TORCH_CHECK_DB = 60.0  # the float ONNX must match torch at least this well (logit SQNR)

# Bars. ResNet-20/56: qc against onnxruntime's quantize_static, on all 10,000 CIFAR-10 test images.
ACCURACY_DROP_MAX_PTS = 0.3  # float - qc top-1, both as run (ORT_ENABLE_ALL)
SQNR_GAIN_VS_ORT_RR_DB = 3.0  # qc - ort(reduce_range=True)
SQNR_GAIN_VS_ORT_DB = 10.0  # qc - ort(defaults)
SPEED_VS_ORT_MIN = 1.0  # qc latency speedup over onnxruntime's quantized model (defaults)
COMPILE_RATIO_MAX = 2.0
# ResNet-18 (random weights): the earlier bars.
R18_SQNR_GAIN_DB = 1.0
# MobileNet: qc within 1 dB of the better onnxruntime MinMax row, and faster than float and than ort.
MB_SQNR_MARGIN_DB = 1.0
MB_SPEED_VS_FLOAT_MIN = 1.0
FULL_CIFAR_IMAGES = 10_000

TOOL_NOTES = {
    "ort": "   # = quant_pre_process(model, pre) + quantize_static(pre, out, reader, QDQ, per_channel, QUInt8/QInt8, MinMax)",
    "ort-rr": "   # = the same with reduce_range=True (7-bit weights)",
    "nncf": "   # = quant_pre_process(model, pre) + nncf.quantize(onnx.load(pre), nncf.Dataset(samples), subset_size=N)",
}


def rel(path: Path | str) -> str:
    """A path as the user types it from the repo root (../shared/... for the shared files)."""
    return os.path.relpath(Path(path).resolve(), REPO)


@dataclass
class NetInfo:
    """What the report says about one network (all of it goes to the JSON; --from-json rebuilds it)."""

    name: str
    float_model: str
    float_command: str  # what produced the float model (or where it comes from)
    calib: str
    calib_data: str  # what the calibration samples are, and the command that writes the file
    eval_data: str  # what the evaluation samples are
    eval_samples: int
    top1: str  # "labels": accuracy against labels; "agreement": with the float model's top-1
    latency_cycles: int  # timed runs per model = latency_cycles * latency_block
    latency_block: int
    eval_batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def latency_runs(self) -> int:
        return self.latency_cycles * self.latency_block


@dataclass
class Network:
    """One float model plus the data every tool and every measurement of it uses."""

    info: NetInfo
    eval_inputs: np.ndarray
    labels: np.ndarray | None  # None: top-1 is agreement with the float model

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def float_model(self) -> Path:
        return REPO / self.info.float_model

    @property
    def calib(self) -> Path:
        return REPO / self.info.calib


@dataclass
class Row:
    """One (network, tool) line of the table."""

    network: str
    tool: str
    command: str
    model: str | None = None
    compile_s: float | None = None  # inside the tool, after imports: load data + quantize + save
    speed_check_s: float = 0.0  # qc: of compile_s, the per-layer speed check's timing (cached after the first compile)
    wall_s: float | None = None  # the whole subprocess, Python start-up and imports included
    peak_rss_mib: float | None = None
    accuracy: float | None = None  # top-1 (labels or agreement), ORT_ENABLE_ALL
    sqnr_db: float | None = None  # logits vs float, ORT_ENABLE_ALL (as run)
    sqnr_basic_db: float | None = None  # logits vs float, ORT_ENABLE_BASIC (Q/DQ simulated in float)
    latency_ms: float | None = None
    speedup: float | None = None  # vs fp32: median over cycles of paired ratios
    speedup_iqr: list[float] | None = None  # its 25th-75th percentile over cycles
    vs_ort: float | None = None  # vs onnxruntime's quantized model (defaults), the same way
    vs_ort_iqr: list[float] | None = None
    vs_ort_rr: float | None = None
    error: str | None = None
    ort_optimized_ops: dict[str, int] = field(default_factory=dict)


def machine() -> dict:
    """The CPU and runtime the figures were measured on (printed above the table, stored in the JSON)."""
    cpu = detect_cpu()
    nncf_version = None
    if importlib.util.find_spec("nncf") is not None:
        from importlib.metadata import version

        nncf_version = version("nncf")
    return {
        "cpu_model": cpu.model,
        "arch": cpu.arch,
        "isa": cpu.isa,
        "isa_description": ISAS.get(cpu.isa, ""),
        "cpu_summary": cpu.summary(),
        "cpu_flags": sorted(cpu.flags),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "nncf": nncf_version,
        "python": sys.version.split()[0],
    }


def machine_lines(m: dict, spinning: bool) -> list[str]:
    nncf = f"NNCF {m['nncf']}: included" if m.get("nncf") else "NNCF: not importable, skipped (pip install nncf to include it)"
    isa = m.get("isa", "")
    saturation = (
        "u8s8 products accumulate in int32 here (no int16 saturation): reduce_range only costs weight precision on this CPU"
        if isa in ("avx512-vnni", "avx-vnni", "arm64-dot")
        else "u8s8 pairs of products are summed in int16 here: 8-bit weights can saturate, which reduce_range avoids"
    )
    return [
        f"CPU: {m['cpu_summary']}; {m['cpus']} CPUs",
        f"ISA {isa}: {m.get('isa_description', '')}; {saturation}",
        f"onnxruntime {m['onnxruntime']}, Python {m.get('python', '?')}; intra-op spinning {'on (--spinning)' if spinning else 'off'}; {nncf}",
    ]


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def prepare_mobilenet(width: float, resolution: int) -> tuple[Path, str, dict]:
    """The MobileNet ONNX, cached under bench/results/ with a sidecar that records the source hash of
    bench/mobilenet.py (a changed builder rebuilds it), the graph summary and the torch check."""
    tag = f"w{width:g}_r{resolution}"
    model = RESULTS / f"mobilenet_{tag}.onnx"
    sidecar = model.with_suffix(".json")
    command = f"python bench/mobilenet.py {rel(model)} --width {width:g} --resolution {resolution}"
    source = _file_sha(Path(mobilenet.__file__))
    meta = json.loads(sidecar.read_text()) if sidecar.exists() and model.exists() else {}
    if meta.get("source_sha") != source:
        print(f"exporting the MobileNet: {command}", flush=True)
        start = time.perf_counter()
        torch_model = mobilenet.export(model, width=width, resolution=resolution, bn_images=mobilenet.BN_COUNT)
        check_images = mobilenet.test_images(SHARED / "data" / "cifar10_test.npz", 16, resolution)
        torch_db = mobilenet.torch_vs_ort_sqnr(torch_model, model, check_images)
        meta = {
            "source_sha": source,
            "width": width,
            "resolution": resolution,
            "graph": mobilenet.graph_summary(model),
            "torch_vs_ort_sqnr_db": torch_db,
            "export_seconds": time.perf_counter() - start,
        }
        sidecar.write_text(json.dumps(meta, indent=2))
    graph = meta["graph"]
    if graph["BatchNormalization"] == 0 or graph["Clip(0,6)"] == 0 or graph["depthwise Conv"] == 0:
        raise SystemExit(f"{rel(model)}: expected BatchNormalization, Clip(0,6) and depthwise Conv nodes, got {graph}")
    if not meta["torch_vs_ort_sqnr_db"] >= MB_TORCH_CHECK_DB:
        raise SystemExit(f"{rel(model)}: onnxruntime's float logits differ from torch's ({meta['torch_vs_ort_sqnr_db']:.1f} dB < {MB_TORCH_CHECK_DB} dB)")
    return model, command, meta


def prepare_networks(names: list[str], calib_count: int, quick: bool, mb_width: float, mb_resolution: int) -> list[Network]:
    """Write the calibration files under bench/results/ and load the evaluation data."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    networks = []
    cifar_names = [n for n in names if n in CIFAR_MODELS]
    if cifar_names:
        calib = RESULTS / "calib_cifar.npz"
        # A seeded random subset of the training images, never test images.
        np.savez_compressed(calib, **cifar.make(SHARED / "data" / "cifar10_train_subset.npz", calib_count, shuffle=True, seed=CALIB_SEED))
        calib_cmd = f"python models/make_cifar10_npz.py ../shared/data/cifar10_train_subset.npz {rel(calib)} --count {calib_count} --shuffle --seed {CALIB_SEED}"
        test = cifar.make(SHARED / "data" / "cifar10_test.npz", 1000 if quick else None)
        n = len(test["input"])
        for name in cifar_names:
            model = SHARED / "models" / CIFAR_MODELS[name]
            info = NetInfo(
                name, rel(model), f"(float model {rel(model)}, pretrained)", rel(calib),
                f"{calib_count} seeded random CIFAR-10 training images ($ {calib_cmd})",
                f"CIFAR-10 test images 0-{n - 1} of ../shared/data/cifar10_test.npz (JPEG-decoded copy; use for relative figures)",
                n, "labels", latency_cycles=30 if quick else 60, latency_block=20, eval_batch=500,
            )
            networks.append(Network(info, test["input"], test["labels"]))
    if "resnet18" in names:
        model = RESULTS / "resnet18.onnx"
        command = f"python bench/resnet18.py {rel(model)}"
        if not model.exists():  # cached: the export is seeded, so the file is the same every time
            print(f"exporting ResNet-18: {command}", flush=True)
            resnet18.export(model)
        calib = RESULTS / "calib_resnet18.npz"
        np.savez_compressed(calib, input=resnet18.random_inputs(R18_CALIB_COUNT, R18_CALIB_SEED))
        count = 8 if quick else 32
        info = NetInfo(
            "resnet18", rel(model), command, rel(calib), f"{R18_CALIB_COUNT} random-normal inputs (seed {R18_CALIB_SEED})",
            f"{count} random-normal inputs (seed {R18_EVAL_SEED}); top-1 = agreement with the float model (random weights)",
            count, "agreement", latency_cycles=10 if quick else 30, latency_block=5, eval_batch=8,
        )
        networks.append(Network(info, resnet18.random_inputs(count, R18_EVAL_SEED), None))
    if "mobilenet" in names:
        model, command, meta = prepare_mobilenet(mb_width, mb_resolution)
        calib = RESULTS / f"calib_mobilenet_r{mb_resolution}.npz"
        np.savez(calib, input=mobilenet.calibration_images(MB_CALIB_COUNT, mb_resolution))  # uncompressed: 77 MB, written in a second
        count = MB_EVAL_COUNT_QUICK if quick else MB_EVAL_COUNT
        r = mb_resolution
        info = NetInfo(
            "mobilenet", rel(model), command, rel(calib),
            f"{MB_CALIB_COUNT} seeded CIFAR-10 training images (../shared/data/cifar10_train_full.npz, disjoint from the "
            f"{mobilenet.BN_COUNT} BN-statistics images), bilinear 32->{r}, ImageNet mean/std "
            f"($ python bench/mobilenet.py --calib-out {rel(calib)} --calib-count {MB_CALIB_COUNT} --resolution {r})",
            f"CIFAR-10 test images 0-{count - 1}, bilinear 32->{r}; top-1 = agreement with the float model's top-1 (random weights)",
            count, "agreement", latency_cycles=30 if quick else 60, latency_block=10, eval_batch=50,
            notes=[
                f"width {meta['width']:g}, {r}x{r}, graph: " + ", ".join(f"{k} {v}" for k, v in meta["graph"].items()),
                f"float ONNX vs torch on 16 test images: logit SQNR {meta['torch_vs_ort_sqnr_db']:.1f} dB (ORT_ENABLE_ALL)",
            ],
        )
        networks.append(Network(info, mobilenet.test_images(SHARED / "data" / "cifar10_test.npz", count, r), None))
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
    """``argv`` as a line to paste into a shell: arguments holding pipeline braces, pipes (format
    lists), spaces or angle brackets are quoted."""
    return " ".join(f'"{a}"' if any(c in a for c in "{|<> ") else a for a in argv)


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
    command = " ".join(argv) + TOOL_NOTES.get(tool, "")
    row = Row(net.name, tool, command)
    print(f"[{net.name}] {tool}: {' '.join(argv)}", flush=True)
    status, row.wall_s, row.peak_rss_mib = run_measured(exe, log)
    if status != 0 or not (out / "model.onnx").exists():
        row.error = f"exit {status}: {_tail(log)}"
        print(f"    FAILED ({rel(log)}): {row.error}", flush=True)
        return row
    row.model = str(out / "model.onnx")
    if tool == "qc":
        report = json.loads((out / "report.json").read_text())
        row.compile_s = report["compile_seconds"]
        speed = next((p["stats"].get("speed_check", {}) for p in report["passes"] if p["name"] == "insert-qdq"), {})
        row.speed_check_s = float(speed.get("seconds", 0.0))
    else:
        row.compile_s = json.loads((out / "timing.json").read_text())["seconds"]
    return row


# --------------------------------------------------------------------------------------------
# Measuring: accuracy, SQNR as run and as simulated, latency, what onnxruntime fused
# --------------------------------------------------------------------------------------------

BLOCK_WARMUP = 2  # untimed runs at the start of every block (as qcompiler.verify): cold caches, parked threads
AS_RUN = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what a user gets: Q/DQ fused into integer kernels
AS_SIMULATED = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # Q/DQ pairs left in place, run in float


def bench_options(spinning: bool, level: ort.GraphOptimizationLevel = AS_RUN) -> ort.SessionOptions:
    """One set of options for every model: qcompiler's own (default intra-op threads), at ``level``.

    The level is set here explicitly, whatever `session_options` defaults to. Intra-op spinning is
    off unless ``spinning``: on this 2-vCPU VM, spinning workers made the float models' latency
    swing 3-19 ms from trial to trial, which inflated every int8 speedup.
    """
    options = session_options(optimize=level == AS_RUN, spinning=spinning)
    options.graph_optimization_level = level
    return options


def make_session(model: str | Path, spinning: bool, level: ort.GraphOptimizationLevel = AS_RUN) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), sess_options=bench_options(spinning, level), providers=["CPUExecutionProvider"])


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


def interleaved_times(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], *, cycles: int, block: int) -> list[list[np.ndarray]]:
    """Block-interleaved timing, as qcompiler.verify.interleaved_latency, but returning every run:
    ``times[model][cycle]`` holds that block's timed runs in seconds.

    Every cycle runs each session for BLOCK_WARMUP untimed + ``block`` timed runs in turn (the
    order rotates every cycle), so a load drift hits all models alike while each model still runs
    back to back with its weights in cache, as deployed. Ratios between any two models are then
    paired per cycle (`paired_ratio`), seconds apart, so drift cancels.
    """
    for s in sessions:  # first runs allocate buffers and pick kernels
        for _ in range(3):
            s.run(None, feed)
    times = [[[] for _ in range(cycles)] for _ in sessions]
    n = len(sessions)
    for cycle in range(cycles):
        for i in [(cycle + j) % n for j in range(n)]:
            for k in range(BLOCK_WARMUP + block):
                start = time.perf_counter()
                sessions[i].run(None, feed)
                if k >= BLOCK_WARMUP:
                    times[i][cycle].append(time.perf_counter() - start)
    return [[np.array(c) for c in t] for t in times]


def paired_ratio(ref: list[np.ndarray], model: list[np.ndarray]) -> tuple[float, list[float]]:
    """How many times faster ``model`` runs than ``ref``: the median over cycles of ref's block median
    over model's block median, with the 25th-75th percentiles of those per-cycle ratios."""
    ratios = np.array([np.median(r) / np.median(m) for r, m in zip(ref, model)])
    return float(np.median(ratios)), [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]


def measure(net: Network, rows: list[Row], spinning: bool) -> None:
    """Fill top-1, SQNR (as run and as simulated) and latency for every row of ``net`` that compiled."""
    ok = [r for r in rows if r.model is not None]
    info = net.info
    print(f"[{net.name}] evaluating {len(ok)} models on {len(net.eval_inputs)} held-out samples, ORT_ENABLE_ALL and ORT_ENABLE_BASIC", flush=True)
    sessions = [make_session(r.model, spinning, AS_RUN) for r in ok]
    logits = {r.tool: logits_of(s, net.eval_inputs, info.eval_batch) for r, s in zip(ok, sessions)}
    ref = logits.get("float")
    if ref is None:
        raise SystemExit(f"[{net.name}] the float model did not run")
    truth = net.labels if net.labels is not None else ref.argmax(-1)
    for row in ok:
        row.accuracy = float(np.mean(logits[row.tool].argmax(-1) == truth))
        if row.tool != "float":
            row.sqnr_db = sqnr_db(ref, logits[row.tool])
    for row in ok:  # one ORT_ENABLE_BASIC session at a time
        basic = make_session(row.model, spinning, AS_SIMULATED)
        # The float row: its own BASIC vs ALL logits, the numerical floor of the comparison.
        row.sqnr_basic_db = sqnr_db(ref, logits_of(basic, net.eval_inputs, info.eval_batch))
        del basic
    print(f"[{net.name}] latency: batch 1, {info.latency_cycles} cycles x {info.latency_block} timed runs per model, block-interleaved", flush=True)
    times = interleaved_times(sessions, {"input": net.eval_inputs[:1]}, cycles=info.latency_cycles, block=info.latency_block)
    index = {r.tool: i for i, r in enumerate(ok)}
    for i, row in enumerate(ok):
        row.latency_ms = float(np.median(np.concatenate(times[i]))) * 1e3
        row.speedup, row.speedup_iqr = paired_ratio(times[index["float"]], times[i])
        if "ort" in index and row.tool != "float":
            row.vs_ort, row.vs_ort_iqr = paired_ratio(times[index["ort"]], times[i])
        if "ort-rr" in index and row.tool != "float":
            row.vs_ort_rr, _ = paired_ratio(times[index["ort-rr"]], times[i])
    for row in ok:
        row.ort_optimized_ops = ort_optimized_ops(row.model, RESULTS / "ort_optimized" / f"{row.tool}_{net.name}.onnx")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str) -> str:
    """``x`` formatted, or a right-aligned '-' of the same width when there is no value."""
    width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if x is None else format(x, fmt)


def print_table(infos: list[NetInfo], rows: list[Row], mach: dict, spinning: bool) -> None:
    print()
    for line in machine_lines(mach, spinning):
        print(line)
    head = (
        f"{'model':<9} {'tool':<6} {'compile s':>9} {'wall s':>7} {'peak MiB':>8} {'top-1 %':>7} {'Δ pts':>6} "
        f"{'SQNR dB':>7} {'basic dB':>8} {'lat ms':>8} {'vs fp32':>7} {'vs ort':>7}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for info in infos:
        print(f"{info.name}: eval {info.eval_data}")
        print(f"{'':<9} calib {info.calib_data}")
        for note in info.notes:
            print(f"{'':<9} {note}")
        base = next((r for r in rows if r.network == info.name and r.tool == "float" and not r.error), None)
        for r in (r for r in rows if r.network == info.name):
            if r.error:
                print(f"{r.network:<9} {r.tool:<6} FAILED: {r.error}")
            else:
                delta = None if r.accuracy is None or r.tool == "float" or base is None else 100 * (r.accuracy - base.accuracy)
                top1 = None if r.accuracy is None else 100 * r.accuracy
                vs_ort = f"{r.vs_ort:6.2f}x" if r.vs_ort is not None else "-".rjust(7)
                print(
                    f"{r.network:<9} {r.tool:<6} {_f(r.compile_s, '9.2f')} {_f(r.wall_s, '7.2f')} {_f(r.peak_rss_mib, '8.0f')} "
                    f"{_f(top1, '7.2f')} {_f(delta, '+6.2f')} {_f(r.sqnr_db, '7.2f')} {_f(r.sqnr_basic_db, '8.2f')} "
                    f"{_f(r.latency_ms, '8.3f')} {_f(r.speedup, '6.2f')}x {vs_ort}"
                )
            print(f"    $ {r.command}")
        print()
    print(
        "compile s: inside the tool after imports (qc: report.json compile_seconds, --no-verify); wall s: the whole\n"
        "subprocess incl. Python start-up and imports; peak MiB: peak RSS of that subprocess (/usr/bin/time %M).\n"
        "top-1 and SQNR dB: onnxruntime with ORT_ENABLE_ALL (integer kernels, as a user runs the model) on the held-out\n"
        "samples above; top-1 is accuracy against the labels for the CIFAR-10 ResNets and agreement with the float model's\n"
        "top-1 for the random-weight networks (resnet18, mobilenet). basic dB: the same SQNR with ORT_ENABLE_BASIC (Q/DQ\n"
        "simulated in float; for the float row, its BASIC vs its ALL logits). SQNR: 10 log10(sum f^2 / sum (f-q)^2) over all\n"
        "logits, f from the float model at ORT_ENABLE_ALL. lat ms: median of all timed batch-1 runs; vs fp32 / vs ort: how\n"
        "many times faster than the float model / onnxruntime's quantized model (defaults), the median over cycles of\n"
        "paired per-cycle block-median ratios (same SessionOptions for all, see --spinning)."
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


def _iqr(r: list[float] | None) -> str:
    return f"IQR over cycles {r[0]:.2f}-{r[1]:.2f}" if r else "no IQR"


#: ISAs whose u8s8 kernels accumulate exactly: onnxruntime's default (8-bit weights) does not
#: saturate there, so the +10 dB bar, which measures saturation, does not apply on them (it is
#: checked on an emulated AVX2 CPU by bench/emulated_avx2.py instead).
EXACT_ISAS = ("avx512-vnni", "avx-vnni", "arm64-dot", "arm64")


def checks(infos: list[NetInfo], rows: list[Row], isa: str = "") -> list[dict]:
    """The bars, one PASS/FAIL line each, plus INFO lines (figures the bars do not judge)."""
    bars = Bars("network")
    add = bars.add

    print("\nBars (all figures as run: onnxruntime ORT_ENABLE_ALL, held-out data):")
    for info in infos:
        get = {r.tool: r for r in rows if r.network == info.name and not r.error}
        qc, ort_, rr, base = get.get("qc"), get.get("ort"), get.get("ort-rr"), get.get("float")
        if base is None:
            add(info.name, "all", None, False, "the float model failed to run")
            continue
        if qc is None:
            add(info.name, "all", None, False, "qc failed to compile: every bar of this network fails")
            continue
        if ort_ is None or rr is None:
            add(info.name, "all", None, None, f"cannot compare: {'ort' if ort_ is None else 'ort-rr'} failed")
            continue
        if info.top1 == "labels":
            if info.eval_samples < FULL_CIFAR_IMAGES:
                print(f"      {info.name:<9} (quick: {info.eval_samples} test images; the bars are defined on all {FULL_CIFAR_IMAGES:,})")
            drop = 100 * (base.accuracy - qc.accuracy)
            add(info.name, "accuracy_drop_pts", drop, drop <= ACCURACY_DROP_MAX_PTS,
                f"top-1 float - qc = {100 * base.accuracy:.2f} - {100 * qc.accuracy:.2f} = {drop:.2f} pts (bar <= {ACCURACY_DROP_MAX_PTS}; "
                f"ort {100 * (base.accuracy - ort_.accuracy):.2f}, ort-rr {100 * (base.accuracy - rr.accuracy):.2f} pts)")
            gain = qc.sqnr_db - rr.sqnr_db
            add(info.name, "sqnr_gain_vs_ort_rr_db", gain, gain >= SQNR_GAIN_VS_ORT_RR_DB,
                f"SQNR qc - ort-rr = {qc.sqnr_db:.2f} - {rr.sqnr_db:.2f} = {gain:+.2f} dB (bar >= +{SQNR_GAIN_VS_ORT_RR_DB:.0f} dB)")
            gain = qc.sqnr_db - ort_.sqnr_db
            text = f"SQNR qc - ort = {qc.sqnr_db:.2f} - {ort_.sqnr_db:.2f} = {gain:+.2f} dB (bar >= +{SQNR_GAIN_VS_ORT_DB:.0f} dB where the kernels saturate)"
            if isa in EXACT_ISAS:
                add(info.name, "sqnr_gain_vs_ort_db", gain, None, f"{text}; not applicable on {isa}, whose kernels do not saturate onnxruntime's 8-bit weights: see python bench/emulated_avx2.py", info=True)
            else:
                add(info.name, "sqnr_gain_vs_ort_db", gain, gain >= SQNR_GAIN_VS_ORT_DB, text)
            add(info.name, "speed_vs_ort", qc.vs_ort, qc.vs_ort >= SPEED_VS_ORT_MIN,
                f"speed qc vs ort = {qc.vs_ort:.3f}x ({_iqr(qc.vs_ort_iqr)}; vs fp32 qc {qc.speedup:.2f}x, ort {ort_.speedup:.2f}x) (bar >= {SPEED_VS_ORT_MIN})")
        elif info.name == "mobilenet":
            best = max((ort_, rr), key=lambda r: r.sqnr_db)
            margin = qc.sqnr_db - best.sqnr_db
            add(info.name, "sqnr_vs_best_ort_db", margin, margin >= -MB_SQNR_MARGIN_DB,
                f"SQNR qc - best onnxruntime MinMax ({best.tool}) = {qc.sqnr_db:.2f} - {best.sqnr_db:.2f} = {margin:+.2f} dB (bar >= -{MB_SQNR_MARGIN_DB:.0f} dB)")
            add(info.name, "speed_vs_float", qc.speedup, qc.speedup >= MB_SPEED_VS_FLOAT_MIN,
                f"speed qc vs fp32 = {qc.speedup:.3f}x ({_iqr(qc.speedup_iqr)}; ort {ort_.speedup:.2f}x, ort-rr {rr.speedup:.2f}x) (bar >= {MB_SPEED_VS_FLOAT_MIN})")
            add(info.name, "speed_vs_ort", qc.vs_ort, qc.vs_ort >= SPEED_VS_ORT_MIN,
                f"speed qc vs ort = {qc.vs_ort:.3f}x ({_iqr(qc.vs_ort_iqr)}; vs ort-rr {qc.vs_ort_rr:.3f}x) (bar >= {SPEED_VS_ORT_MIN})")
        else:  # resnet18: the earlier bars against onnxruntime's defaults
            add(info.name, "speed_vs_ort", qc.vs_ort, qc.vs_ort >= SPEED_VS_ORT_MIN,
                f"speed qc vs ort = {qc.vs_ort:.3f}x ({_iqr(qc.vs_ort_iqr)}; vs fp32 qc {qc.speedup:.2f}x, ort {ort_.speedup:.2f}x) (bar >= {SPEED_VS_ORT_MIN})")
            gain = qc.sqnr_db - ort_.sqnr_db
            add(info.name, "sqnr_gain_vs_ort_db", gain, gain >= R18_SQNR_GAIN_DB,
                f"SQNR qc - ort = {qc.sqnr_db:.2f} - {ort_.sqnr_db:.2f} = {gain:+.2f} dB (bar >= +{R18_SQNR_GAIN_DB:.0f} dB)")
        # The per-layer speed check times each new layer shape once per machine and onnxruntime
        # version and reads it from its cache after: the bar is on a compile that found the cache
        # warm; the first compile's extra seconds are printed beside it.
        warm = qc.compile_s - qc.speed_check_s
        cratio = warm / ort_.compile_s
        first = f"; the first compile on this machine {qc.compile_s:.2f} s, of which {qc.speed_check_s:.2f} s timing layers" if qc.speed_check_s >= 0.05 else ""
        text = f"compile qc/ort = {warm:.2f} s / {ort_.compile_s:.2f} s = {cratio:.2f}x (wall {qc.wall_s:.2f} / {ort_.wall_s:.2f} s{first})"
        if info.name == "mobilenet":
            add(info.name, "compile_ratio", cratio, None, text, info=True)
        else:
            add(info.name, "compile_ratio", cratio, cratio <= COMPILE_RATIO_MAX, f"{text} (bar <= {COMPILE_RATIO_MAX:.0f}x)")
        gaps = ", ".join(f"{r.tool} {r.sqnr_basic_db - r.sqnr_db:+.2f}" for r in (qc, ort_, rr, get.get("nncf")) if r is not None)
        add(info.name, "simulated_minus_run_db", qc.sqnr_basic_db - qc.sqnr_db, None, f"SQNR as simulated (BASIC) - as run (ALL), dB: {gaps}", info=True)
    return bars.results


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {rel(path)}")


def from_json(path: Path) -> int:
    """Re-print an earlier run's table, fusion and bars (the bars recomputed from its rows)."""
    stored = json.loads(path.read_text())
    if "machine" not in stored or not isinstance(stored.get("networks"), list):
        raise SystemExit(f"{path}: written by an older compare_ort.py (no machine / network records); run the bench again")
    known = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in r.items() if k in known}) for r in stored["rows"]]
    info_fields = {f.name for f in fields(NetInfo)}
    infos = [NetInfo(**{k: v for k, v in n.items() if k in info_fields}) for n in stored["networks"]]
    print(f"(re-printed from {rel(path)}: a {stored.get('mode', '?')} run)")
    print_table(infos, rows, stored["machine"], stored.get("spinning", False))
    print_fusion(rows)
    results = checks(infos, rows, stored["machine"].get("isa", ""))
    print(f"\ntotal run time {stored.get('total_seconds', 0):.0f} s ({stored.get('mode', '?')} mode)")
    return exit_status(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{','.join(QUICK_MODELS)} by default; 1,000 CIFAR test images, {MB_EVAL_COUNT_QUICK} for the MobileNet, fewer latency runs")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(ALL_MODELS)} (default: all; with --quick {','.join(QUICK_MODELS)})")
    parser.add_argument("--calib-count", type=int, default=256, help="CIFAR-10 calibration images for the ResNets (seeded subset of the training images)")
    parser.add_argument("--mobilenet-width", type=float, default=1.0, help="MobileNet width multiplier")
    parser.add_argument("--mobilenet-resolution", type=int, default=224, help="MobileNet input size")
    parser.add_argument("--spinning", action="store_true", help="keep onnxruntime's intra-op spinning on (its default; noisier here)")
    parser.add_argument("--json", type=Path, default=RESULTS / "compare_ort.json", help="write all results here")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table and bars of an earlier run's --json file, compiling nothing")
    args = parser.parse_args()
    if args.from_json is not None:
        sys.exit(from_json(args.from_json))
    names = [n.strip() for n in (args.models or ",".join(QUICK_MODELS if args.quick else ALL_MODELS)).split(",") if n.strip()]
    if unknown := [n for n in names if n not in ALL_MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(ALL_MODELS)}")

    start = time.perf_counter()
    mach = machine()
    tools = ["qc", "ort", "ort-rr"] + (["nncf"] if mach["nncf"] else [])
    for line in machine_lines(mach, args.spinning):
        print(line, flush=True)

    networks = prepare_networks(names, args.calib_count, args.quick, args.mobilenet_width, args.mobilenet_resolution)
    rows: list[Row] = []
    for net in networks:
        net_rows = [Row(net.name, "float", net.info.float_command, model=str(net.float_model))]
        net_rows += [compile_with(tool, net) for tool in tools]
        measure(net, net_rows, args.spinning)
        rows += net_rows

    infos = [n.info for n in networks]
    print_table(infos, rows, mach, args.spinning)
    print_fusion(rows)
    results = checks(infos, rows, mach.get("isa", ""))
    total = time.perf_counter() - start
    print(f"\ntotal run time {total:.0f} s ({'quick' if args.quick else 'full'} mode)")

    if args.json:
        write_json(args.json, {
            "mode": "quick" if args.quick else "full",
            "machine": mach,
            "onnxruntime": ort.__version__,
            "tools": tools,
            "calib_count": args.calib_count,
            "spinning": args.spinning,
            "measured_with": {"as_run": "ORT_ENABLE_ALL", "as_simulated": "ORT_ENABLE_BASIC"},
            "networks": [asdict(i) for i in infos],
            "rows": [asdict(r) for r in rows],
            "checks": results,
            "total_seconds": total,
        })
    sys.exit(exit_status(results))


if __name__ == "__main__":
    main()
