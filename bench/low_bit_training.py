"""Low-bit training on the ONNX graph (slb, learn-bits, qat) against float and uniform widths, in one run.

    python bench/low_bit_training.py --rows lenet             # MNIST LeNet-5: W2A4 and learn-bits <= 2 bits (~15 min on 2 cores)
    python bench/low_bit_training.py --rows resnet20-w2       # CIFAR-10 ResNet-20 W2A8 with slb (~45 min)
    python bench/low_bit_training.py --rows resnet20-bits     # learn-bits at 2.5 bits + qat (~45 min)
    python bench/low_bit_training.py --rows resnet20-bits-slb # learn-bits widths, slb at them + qat (~50 min)
    python bench/low_bit_training.py --rows resnet20-uniform  # uniform 2-bit with learn-bits' training, its baseline (~45 min)
    python bench/low_bit_training.py --rows resnet20-w1       # W1A8 (bipolar) slb 2 epochs + qat (~25 min)
    python bench/low_bit_training.py --rows resnet20-cost     # slb vs qat at 4 bits: peak memory and time per epoch, 5,000 images (~5 min)
    python bench/low_bit_training.py --rows lenet --quick     # a smoke check of every LeNet row (~3 min)
    python bench/low_bit_training.py --rows resnet20-bits-slb --target bench/targets/ort-cpu-full-low-bit.toml
                                                              # the same rows with all 2^b codes of a width (2 bits: -2..1)

Each row is one `qc compile` subprocess on the ort-cpu target or --target's (the command is printed beside it),
so its peak memory is its own. Accuracy is measured in onnxruntime (ORT_ENABLE_ALL) on the model
written: all 10,000 test images (CIFAR-10: the JPEG-decoded copy, for the drop against float)
and, for CIFAR-10, the 1,000 lossless ones (absolute, beside the published figures). Training
data: MNIST's 60,000 training images; CIFAR-10's 50,000 (../shared/data/cifar10_train_full.npz,
shuffled once, seed 0). Each training pass holds out the last 1,000 of them and reports torch vs
onnxruntime on those. Widths: "bits" is the average width of the stored weight values (a 2-bit
code kept in int8 counts 2); weight KiB is what the graph stores, scales included. Where the
first and last layer are at 8 bits the row says so. s/epoch and peak MiB are the training pass's
own (seconds per epoch; the highest resident memory sampled while it trained).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from compare_ort import RESULTS, SHARED, _tail, cifar, machine, machine_lines, rel, run_measured, shell_line  # noqa: E402
from low_bit import _logits, _session, stored_weight_bytes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QC = str(Path(sys.executable).parent / "qc")
LENET = REPO / "models" / "mnist_lenet5.onnx"
RESNET20 = SHARED / "models" / "cifar10_resnet20.onnx"
MNIST_TRAIN, MNIST_TEST = RESULTS / "lbt_mnist_train60k.npz", RESULTS / "lbt_mnist_test.npz"
CIFAR_TRAIN, CIFAR_TEST, CIFAR_LOSSLESS = RESULTS / "lb_train50000.npz", RESULTS / "lb_test.npz", RESULTS / "lb_test_lossless1000.npz"
HEAD = "infer-shapes,fold-constants"
TAIL = "fold-batchnorm,calibrate,insert-qdq"

#: Published figures, printed beside ours (labelled as published; their training runs from scratch
#: for hundreds of epochs, ours fine-tunes the pretrained ONNX model for a few).
PUBLISHED = {
    "lenet": [
        "BitNet (Raghavan et al. 2017), MNIST: 7-11 % error with learned widths (../shared/design/ALGORITHMS.md)",
        "Bayesian Bits (van Baalen et al. 2020), MNIST LeNet-5: 99.30 % at 0.36 % of the float BOPs (issue 14)",
    ],
    "resnet20": [
        "SLB (Yang et al. 2020), CIFAR-10 ResNet-20: W2/A32 92.0 %, W4/A32 92.1 % (issue 14; trained from scratch)",
        "SLB, CIFAR-10 VGG-Small W/A 1/1, 2/2, 4/4: 92.1 %, 93.5 %, 93.8 % (../shared/design/ALGORITHMS.md)",
        "DoReFa, LSQ, Uhlich et al.: no ResNet-20 figure verified from the sources available to this bench, so none printed",
    ],
}


@dataclass
class Spec:
    name: str
    group: str
    model: Path
    train: Path
    test: Path
    pipeline: str
    what: str
    lossless: Path | None = None
    extra: list[str] = field(default_factory=list)


@dataclass
class Row:
    name: str
    group: str
    what: str
    command: str
    seconds: float | None = None
    top1: float | None = None
    top1_lossless: float | None = None
    weight_bytes: int | None = None
    average_bits: float | None = None
    train_seconds_per_epoch: float | None = None
    peak_memory_mib: float | None = None
    torch_top1: float | None = None
    onnxruntime_top1: float | None = None
    error: str | None = None


def specs(quick: bool) -> list[Spec]:
    """Every row this bench can run, by group."""
    lenet_epochs = 1 if quick else 6
    cifar_epochs = 1 if quick else 6
    # learn-bits: five epochs and one of qat keep the recipe within the hour on 2 cores.
    bits_epochs = 1 if quick else 5
    # W1 is reported, not held to a bar: a shorter run.
    w1_epochs = 1 if quick else 2
    n = ",max-minutes=2" if quick else ""
    mnist = dict(model=LENET, train=MNIST_TRAIN, test=MNIST_TEST)
    cifar_common = dict(model=RESNET20, train=CIFAR_TRAIN, test=CIFAR_TEST, lossless=CIFAR_LOSSLESS)
    aug = "augment=crop-flip,"
    # A qat pass on the written Q/DQ graph after each ResNet-20 training pass: the activation
    # steps learn their 8-bit ranges and the weights train at exactly their deployed codes.
    def qat_after(epochs: int) -> str:
        return f"qat{{epochs={epochs},lr=2e-5,{aug}loss=cross-entropy+kl{n}}}"
    return [
        Spec("lenet-w2a4-slb", "lenet", pipeline=f"{HEAD},slb{{bits=2,activation-bits=4,epochs={lenet_epochs},batch-size=128,loss=cross-entropy+kl{n}}},{TAIL},"
             f"qat{{epochs=1,lr=1e-4,batch-size=128,loss=cross-entropy+kl{n}}}", what="W2A4 slb + qat (activations)", **mnist),
        Spec("lenet-w2a8-uniform", "lenet", pipeline=f"{HEAD},adaround{{bits=2,iterations=0}},{TAIL}", what="W2A8 rounding to nearest", **mnist),
        Spec("lenet-bits2", "lenet", pipeline=f"{HEAD},learn-bits{{budget=bits=2,epochs={lenet_epochs},batch-size=128,loss=cross-entropy+kl{n}}},{TAIL}",
             what="learn-bits <= 2 bits (uhlich)", **mnist),
        Spec("lenet-bits2-bitnet", "lenet", pipeline=f"{HEAD},learn-bits{{budget=bits=2,method=bitnet,initial-bits=4,epochs={lenet_epochs},batch-size=128,loss=cross-entropy+kl{n}}},{TAIL}",
             what="learn-bits <= 2 bits (bitnet rule)", **mnist),
        Spec("resnet20-w2-slb", "resnet20-w2", pipeline=f"{HEAD},slb{{bits=2,first-last-bits=8,epochs={cifar_epochs},{aug}loss=cross-entropy+kl{n}}},{TAIL},"
             + qat_after(1 if quick else 2), what="W2A8 slb + qat (first/last 8-bit)", **cifar_common),
        Spec("resnet20-bits2.5", "resnet20-bits", pipeline=f"{HEAD},learn-bits{{budget=bits=2.5,first-last-bits=8,epochs={bits_epochs},{aug}loss=cross-entropy+kl{n}}},{TAIL},"
             + qat_after(1), what="learn-bits <= 2.5 bits + qat (first/last 8-bit)", **cifar_common),
        # learn-bits chooses the widths in one epoch (keeping the pretrained weights: slb started
        # from its codes reached 76.68 %, under the uniform row); slb then searches each layer's
        # weights at its width and qat trains the activations, as in the uniform W2 slb row.
        Spec("resnet20-bits2.5-slb", "resnet20-bits-slb", pipeline=f"{HEAD},learn-bits{{budget=bits=2.5,first-last-bits=8,epochs=1,keep-weights=true,{aug}loss=cross-entropy+kl{n}}},"
             f"slb{{bits=0,first-last-bits=8,epochs={1 if quick else 5},{aug}loss=cross-entropy+kl{n}}},{TAIL},"
             + qat_after(1 if quick else 2), what="learn-bits widths <= 2.5 bits, slb at them + qat (first/last 8-bit)", **cifar_common),
        Spec("resnet20-w1-slb", "resnet20-w1", pipeline=f"{HEAD},slb{{bits=1,first-last-bits=8,epochs={w1_epochs},{aug}loss=cross-entropy+kl{n}}},{TAIL},"
             + qat_after(1), what="W1A8 slb + qat, bipolar (first/last 8-bit)", **cifar_common),
        Spec("resnet20-uniform2", "resnet20-uniform", pipeline=f"{HEAD},learn-bits{{budget=bits=2.03,initial-bits=2,first-last-bits=8,epochs={bits_epochs},{aug}loss=cross-entropy+kl{n}}},{TAIL},"
             + qat_after(1),
             what="uniform 2-bit, same training (first/last 8-bit; their 1,072 weights make the average 2.02)", **cifar_common),
        Spec("resnet20-w4-slb-1ep", "resnet20-cost", pipeline=f"{HEAD},slb{{bits=4,epochs=1,{aug}loss=cross-entropy+kl{n}}},{TAIL}",
             what="W4A8 slb, 1 epoch on 5,000 images (cost)", extra=["--calib-count", "5000"], **cifar_common),
        Spec("resnet20-w4-qat-1ep", "resnet20-cost", pipeline=f"{HEAD},fold-batchnorm,adaround{{bits=4,iterations=0}},calibrate,insert-qdq,"
             f"qat{{epochs=1,lr=1e-5,{aug}loss=cross-entropy+kl{n}}}", what="W4A8 qat, 1 epoch on 5,000 images (cost)", extra=["--calib-count", "5000"], **cifar_common),
    ]


def prepare() -> None:
    import train_lenet5_mnist as mnist

    RESULTS.mkdir(parents=True, exist_ok=True)
    if not MNIST_TRAIN.exists():
        np.savez(MNIST_TRAIN, **mnist.make_npz("train"))
    if not MNIST_TEST.exists():
        np.savez(MNIST_TEST, **mnist.make_npz("test"))
    if not CIFAR_TRAIN.exists():
        np.savez(CIFAR_TRAIN, **cifar.make(SHARED / "data" / "cifar10_train_full.npz", None, shuffle=True, seed=0))
    if not CIFAR_TEST.exists():
        np.savez(CIFAR_TEST, **cifar.make(SHARED / "data" / "cifar10_test.npz"))
    if not CIFAR_LOSSLESS.exists():
        np.savez(CIFAR_LOSSLESS, **cifar.make(SHARED / "data" / "cifar10_test_lossless1000.npz"))


def _top1(path: Path, data: Path) -> float:
    d = np.load(data)
    return 100 * float(np.mean(_logits(_session(path), d["input"]).argmax(1) == d["labels"]))


def _pass_stats(report: dict, names: tuple[str, ...]) -> dict:
    for p in report.get("passes", []):
        if p.get("name") in names:
            return p.get("stats", {})
    return {}


def float_row(group: str, model: Path, test: Path, lossless: Path | None) -> Row:
    row = Row(f"{group}-float", group, "float", f"(float model {rel(model)})", top1=_top1(model, test), average_bits=32.0,
              weight_bytes=sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(model)).graph.initializer if len(t.dims) >= 2))
    if lossless is not None:
        row.top1_lossless = _top1(model, lossless)
    return row


def compile_row(spec: Spec, target: str = "ort-cpu") -> Row:
    out = RESULTS / f"lbt_{spec.name}" if target == "ort-cpu" else RESULTS / f"lbt_{spec.name}_{Path(target).stem}"
    argv = [QC, "compile", rel(spec.model), "--target", target, "--calib", rel(spec.train), "--data", rel(spec.test),
            "-o", rel(out), "--force", "--latency-runs", "0", "--pipeline", spec.pipeline, *spec.extra]
    row = Row(spec.name, spec.group, spec.what, shell_line(["qc"] + argv[1:]))
    print(f"[{spec.name}] {row.command}", flush=True)
    log = RESULTS / "logs" / f"{out.name}.log"
    status, row.seconds, _ = run_measured(argv, log)
    if status not in (0, 1) or not (out / "model.onnx").exists():
        row.error = f"exit {status}: {_tail(log)}"
        print(f"    FAILED: {row.error}", flush=True)
        return row
    report = json.loads((out / "report.json").read_text())
    row.top1 = _top1(out / "model.onnx", spec.test)
    if spec.lossless is not None:
        row.top1_lossless = _top1(out / "model.onnx", spec.lossless)
    row.weight_bytes, row.average_bits = stored_weight_bytes(out / "model.onnx")
    stats = _pass_stats(report, ("slb", "learn-bits", "qat"))
    seconds = stats.get("seconds_per_epoch") or []
    row.train_seconds_per_epoch = float(np.mean(seconds)) if seconds else None
    row.peak_memory_mib = stats.get("training_peak_memory_mib") or stats.get("peak_memory_mib")
    row.torch_top1, row.onnxruntime_top1 = stats.get("top1_torch"), stats.get("top1_onnxruntime")
    print(f"    top-1 {row.top1:.2f} %, {row.average_bits:.2f} bits, {row.seconds:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="lenet", help="groups to run: lenet, resnet20-w2, resnet20-w1, resnet20-bits, resnet20-bits-slb, resnet20-uniform, resnet20-cost (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2 minutes per training pass: a smoke check")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--target", default="ort-cpu", help="the target every row compiles for: a built-in name or a .toml file")
    args = parser.parse_args()
    started = time.perf_counter()
    mach = machine()
    for line in machine_lines(mach, spinning=False):
        print(line)
    prepare()
    groups = args.rows.split(",")
    chosen = [s for s in specs(args.quick) if s.group in groups]
    if not chosen:
        raise SystemExit(f"no rows in groups {groups}: choose from lenet, resnet20-w2, resnet20-w1, resnet20-bits, resnet20-bits-slb, resnet20-uniform, resnet20-cost")
    rows: list[Row] = []
    floats: dict[str, Row] = {}
    for spec in chosen:
        family = "lenet" if spec.model == LENET else "resnet20"
        if family not in floats:
            floats[family] = float_row(family, spec.model, spec.test, spec.lossless)
            rows.append(floats[family])
        rows.append(compile_row(spec, args.target))
    report(rows, floats, args.quick)
    print(f"\ntotal run time {time.perf_counter() - started:.0f} s")
    path = args.json or RESULTS / f"low_bit_training_{'_'.join(groups)}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"machine": mach, "quick": args.quick, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {rel(path)}")


def _family(row: Row) -> str:
    return "lenet" if row.name.startswith("lenet") else "resnet20"


def report(rows: list[Row], floats: dict[str, Row], quick: bool) -> None:
    print()
    print("ort-cpu, as run (ORT_ENABLE_ALL): top-1 on all 10,000 test images (Δ against float); CIFAR-10 also on the 1,000 lossless ones")
    print(f"{'row':<22} {'what':<46} {'bits':>5} {'weight KiB':>10} {'top-1 %':>8} {'Δ pts':>6} {'lossless %':>10} {'s/epoch':>8} {'peak MiB':>8} {'s':>6}")
    for r in rows:
        if r.error:
            print(f"{r.name:<22} {r.what:<46}  FAILED {r.error}")
            continue
        delta = "" if r.what == "float" else f"{r.top1 - floats[_family(r)].top1:+.2f}"
        lossless = f"{r.top1_lossless:10.2f}" if r.top1_lossless is not None else f"{'-':>10}"
        epoch = f"{r.train_seconds_per_epoch:8.0f}" if r.train_seconds_per_epoch else f"{'-':>8}"
        peak = f"{r.peak_memory_mib:8.0f}" if r.peak_memory_mib else f"{'-':>8}"
        secs = f"{r.seconds:6.0f}" if r.seconds is not None else f"{'-':>6}"
        print(f"{r.name:<22} {r.what:<46} {r.average_bits:5.2f} {r.weight_bytes / 1024:10.1f} {r.top1:8.2f} {delta:>6} {lossless} {epoch} {peak} {secs}")
        if r.what != "float":
            print(f"    $ {r.command}")
            if r.torch_top1 is not None:
                print(f"    held-out training samples: torch {r.torch_top1:.2f} %, onnxruntime {r.onnxruntime_top1:.2f} % (the model the training pass wrote: float activations after slb and learn-bits)")
    for family in floats:
        print(f"\npublished ({family}; not measured here):")
        for line in PUBLISHED[family]:
            print(f"    {line}")
    print()
    by = {r.name: r for r in rows if not r.error}
    checks = [
        ("lenet-w2a4-slb", lambda r: r.top1 >= 99.1, "LeNet-5 W2A4 top-1 >= 99.1 %"),
        ("lenet-bits2", lambda r: r.top1 >= 99.2 and r.average_bits <= 2.0 + 1e-9, "LeNet-5 learn-bits <= 2 bits at >= 99.2 %"),
        ("resnet20-w2-slb", lambda r: floats["resnet20"].top1 - r.top1 <= 2.5, "ResNet-20 W2A8 slb drop <= 2.5 pts"),
        ("resnet20-bits2.5", lambda r: floats["resnet20"].top1 - r.top1 <= 1.0 and r.average_bits <= 2.5 + 1e-9, "ResNet-20 learn-bits <= 2.5 bits within 1.0 pt of float"),
        ("resnet20-bits2.5-slb", lambda r: floats["resnet20"].top1 - r.top1 <= 1.0 and r.average_bits <= 2.5 + 1e-9, "ResNet-20 learn-bits widths + slb <= 2.5 bits within 1.0 pt of float"),
    ]
    for name, ok, label in checks:
        if name in by:
            r = by[name]
            print(f"{'PASS' if ok(r) else 'FAIL'}  {label}: top-1 {r.top1:.2f} % at {r.average_bits:.2f} bits (float {floats[_family(r)].top1:.2f} %)")
    if "resnet20-bits2.5" in by and "resnet20-uniform2" in by:
        gain = by["resnet20-bits2.5"].top1 - by["resnet20-uniform2"].top1
        print(f"{'PASS' if gain >= 0.5 else 'FAIL'}  learn-bits 2.5 bits vs uniform 2-bit, same training: {gain:+.2f} pts (bar >= +0.5)")
    if "resnet20-bits2.5" in by and "resnet20-w2-slb" in by:
        # slb's uniform 2-bit row trains longer (its own epochs and two of qat): a harder baseline.
        gain = by["resnet20-bits2.5"].top1 - by["resnet20-w2-slb"].top1
        print(f"{'PASS' if gain >= 0.5 else 'FAIL'}  learn-bits 2.5 bits vs uniform 2-bit by slb + qat: {gain:+.2f} pts (bar >= +0.5)")
    if "resnet20-bits2.5-slb" in by and "resnet20-w2-slb" in by:
        # The same slb + qat training; only the widths differ (learned against uniform 2-bit).
        gain = by["resnet20-bits2.5-slb"].top1 - by["resnet20-w2-slb"].top1
        print(f"{'PASS' if gain >= 0.5 else 'FAIL'}  learned widths (2.5 bits) vs uniform 2-bit, both slb + qat: {gain:+.2f} pts (bar >= +0.5)")
    if "resnet20-w4-slb-1ep" in by and "resnet20-w4-qat-1ep" in by:
        s, q = by["resnet20-w4-slb-1ep"], by["resnet20-w4-qat-1ep"]
        if s.peak_memory_mib and q.peak_memory_mib and s.train_seconds_per_epoch and q.train_seconds_per_epoch:
            mem, t = s.peak_memory_mib / q.peak_memory_mib, s.train_seconds_per_epoch / q.train_seconds_per_epoch
            print(f"{'PASS' if mem <= 1.3 else 'FAIL'}  slb W4 peak memory {s.peak_memory_mib:.0f} MiB = {mem:.2f}x qat's {q.peak_memory_mib:.0f} MiB (bar <= 1.3x; the paper: +30 %)")
            print(f"{'PASS' if t <= 2.0 else 'FAIL'}  slb W4 time per epoch {s.train_seconds_per_epoch:.0f} s = {t:.2f}x qat's {q.train_seconds_per_epoch:.0f} s (bar <= 2x; the paper: 1.4-2x)")
    if quick:
        print("(--quick: one epoch cut at 2 minutes per training pass; the bars are for the full run)")


if __name__ == "__main__":
    main()
