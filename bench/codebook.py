"""Codebook compression (Choi et al. 2017) on CIFAR-10 ResNet-32 and MNIST LeNet-5, in one run.

    python bench/codebook.py                 # full: ResNet-32 and LeNet-5, whole test sets
    python bench/codebook.py --quick         # 2,000 test images, fewer rates, LeNet-5 and ResNet-32
    python bench/codebook.py --models lenet5
    python bench/codebook.py --models resnet32 --recipe-only   # the README's one-command recipe alone
    python bench/codebook.py --rows uniform,ECSQ               # only the rows whose label starts so (no recipe)

Every row is one `qc compile` (cluster-weights / finetune-codebook, network scope, BatchNorm left
unfolded so all layers share one weight scale) followed by `qc pack`; the row prints both
commands. The "recipe" row is the README's single command: prune in stages with retraining
(`finetune-weights`), cluster, fine-tune the codebook, from the float model; its wall time is the
bar's (ResNet-32: at most 75 minutes). It runs with --dump-dir, and the model after its last
retraining (a float model with the pruned weights at zero) is what the other pruned rows cluster;
their accuracy loss is counted against the original float model. Retraining reads all training
images (ResNet-32: the 50,000 of ../shared/data/cifar10_train_full.npz, memory-mapped; LeNet-5:
MNIST's 60,000). Columns: the paper's compression ratio (32 x weights / coded bits: Huffman-coded
indices and zero runs, codebook, code tables), the ratio of the whole `.qcz` file against the
float32 weights, and top-1 accuracy measured by qc in onnxruntime on the test set; the recipe rows
add the 1,000 lossless CIFAR-10 test images (`qc verify`), beside Choi et al.'s 92.58 -> 92.68.

Bars (the issue's): Hessian-weighted k-means at least as accurate as plain k-means at every
rate without fine-tuning (each Hessian row against the most compressed k-means row not above its
compression ratio: Hessian weighting compresses more at the same cluster count); ECSQ at least as
accurate as uniform at every entropy (no pruning, no fine-tuning); the recipe: ResNet-32 >= 22x
with at most 0.5 points lost in at most 75 minutes, LeNet-5 >= 51.25x at >= 99.27 %; clustering
ResNet-32 at network scope in under 60 s. Choi et al.'s published figures are printed beside.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_ort import REPO, RESULTS, SHARED, Bars, _f, _tail, cifar, exit_status, machine, machine_lines, rel, shell_line  # noqa: E402

sys.path.insert(0, str(REPO / "models"))
import train_lenet5_mnist as mnist  # noqa: E402

QC = str(Path(sys.executable).parent / "qc")
LENET = REPO / "models" / "mnist_lenet5.onnx"
RESNET32 = SHARED / "models" / "cifar10_resnet32.onnx"

# The issue's bars.
RESNET_RATIO_MIN, RESNET_DROP_MAX, RESNET_MINUTES_MAX = 22.0, 0.5, 75.0
LENET_RATIO_MIN, LENET_ACCURACY_MIN = 51.25, 0.9927
CLUSTER_SECONDS_MAX = 60.0

# Choi et al. 2017, Table 1 (pruning + quantization + fine-tuning + Huffman), as published.
PUBLISHED = (("LeNet-5 MNIST", "51.25x", "99.27 % (float 99.25 %)"), ("ResNet-32 CIFAR-10", "22.17x", "92.41 % (float 92.58 %)"))


@dataclass
class Setup:
    name: str
    model: Path
    train: Path
    test: Path
    lossless: Path | None = None  # CIFAR-10's 1,000 lossless test images (the recipe's second figure)


@dataclass
class Row:
    model: str
    label: str
    pipeline: str
    commands: list[str]
    ratio: float | None = None  # 32 x weights / coded bits
    file_ratio: float | None = None  # float32 weight bytes / .qcz bytes
    entropy_bits: float | None = None
    accuracy_float: float | None = None
    accuracy: float | None = None
    cluster_seconds: float | None = None
    finetune_seconds: float | None = None
    wall_minutes: float | None = None  # the whole qc compile (recipe rows)
    accuracy_lossless: float | None = None
    accuracy_lossless_float: float | None = None
    error: str | None = None

    @property
    def drop_pts(self) -> float | None:
        return None if self.accuracy is None else 100 * (self.accuracy_float - self.accuracy)


def prepare(names: list[str], quick: bool) -> list[Setup]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    setups = []
    test_count = 2000 if quick else None
    if "lenet5" in names:
        if not LENET.exists():
            raise SystemExit(f"{rel(LENET)} is missing: run python models/train_lenet5_mnist.py")
        # All 60,000 training images: retraining after pruning needs them (Hessians use 1,000).
        train, test = RESULTS / "cb_mnist_train60k.npz", RESULTS / "cb_mnist_test.npz"
        if not train.exists():
            np.savez(train, **mnist.make_npz("train", None))
        np.savez(test, **mnist.make_npz("test", test_count))
        setups.append(Setup("lenet5", LENET, train, test))
    if "resnet32" in names:
        train, test = RESULTS / "cb_cifar_train50k.npz", RESULTS / "cb_cifar_test.npz"
        lossless = RESULTS / "cb_cifar_test_lossless.npz"
        if not train.exists():
            # Uncompressed, so qc memory-maps it (614 MB of float32) and retraining reads batches.
            np.savez(train, **cifar.make(SHARED / "data" / "cifar10_train_full.npz", shuffle=True, seed=0))
        np.savez(test, **cifar.make(SHARED / "data" / "cifar10_test.npz", test_count))
        np.savez(lossless, **cifar.make(SHARED / "data" / "cifar10_test_lossless1000.npz"))
        setups.append(Setup("resnet32", RESNET32, train, test, lossless))
    return setups


#: Iterative magnitude pruning, network scope (Han et al.): each stage prunes to a higher ratio the
#: network the previous stage retrained, for that many epochs of finetune-weights.
PRUNE_SCHEDULE = {"lenet5": ((0.6, 1), (0.8, 1), (0.9, 2), (0.92, 5)), "resnet32": ((0.5, 1), (0.7, 2), (0.8, 9))}
#: finetune-weights options per model. ResNet-32 (bench/notes/resnet32_full_training_set.md has
#: the runs, resnet32_retraining.md the variants on 10,000 images): SGD with momentum, a cosine rate from 0.01 per stage, crop-flip augmentation, and
#: cross-entropy plus KL to the unpruned network (distillation); LeNet-5: Adam, distillation, no
#: augmentation.
RETRAIN = {"lenet5": "lr=0.001,loss=cross-entropy+kl",
           "resnet32": "batch-size=128,optimizer=sgd,lr=0.01,weight-decay=0.0001,loss=cross-entropy+kl,augment=crop-flip"}
#: The recipe's clustering and codebook fine-tuning: entropy of the indices after pruning (LeNet-5
#: at 92 %: 2.5 bits; ResNet-32 at 80 %: 3.0 bits, where uniform clustering costs ~0 points).
RECIPE_CLUSTER = {"lenet5": "cluster-weights{method=uniform,target-bits=2.5}",
                  "resnet32": "cluster-weights{method=uniform,target-bits=3}"}
RECIPE_TUNE = {"lenet5": "finetune-codebook{epochs=3,lr=0.0001,loss=cross-entropy+kl}",
               "resnet32": "finetune-codebook{epochs=1,batch-size=128,lr=0.0001,loss=cross-entropy+kl,augment=crop-flip}"}
#: Other pruned rows (from the recipe's pruned model): index entropies around each bar.
PRUNED_RATES = {"lenet5": (2.0, 2.5), "resnet32": (2.5, 3.0)}


def retrain_pipeline(model: str) -> str:
    """The passes that prune and retrain ``model``."""
    return ",".join(f"prune-magnitude{{ratio={ratio},scope=network}},finetune-weights{{epochs={epochs},{RETRAIN[model]}}}" for ratio, epochs in PRUNE_SCHEDULE[model])


#: The recipe's last pass: a BatchNormalization after a clustered convolution cannot be folded into
#: its shared centres, so fold-batchnorm rewrites it as Mul + Add, two vectors per channel instead
#: of four (ResNet-32: the .qcz 9 kB smaller, the same outputs to float rounding).
RECIPE_FINISH = "fold-batchnorm"


def recipe_pipeline(model: str) -> str:
    """The README's one command: prune and retrain, cluster, fine-tune the codebook."""
    return f"{retrain_pipeline(model)},{RECIPE_CLUSTER[model]},{RECIPE_TUNE[model]},{RECIPE_FINISH}"


def configurations(model: str, quick: bool) -> list[tuple[str, str, bool]]:
    """(label, passes after infer-shapes,fold-constants, whether it starts from the pruned and
    retrained model) of every row of a model."""
    ks = (4, 8, 16) if quick else (4, 8, 16, 32)
    rates = (2.0, 3.0) if quick else (1.5, 2.0, 2.5, 3.0)
    rows = []
    for k in ks:
        rows.append((f"k-means K={k}", f"cluster-weights{{method=kmeans,clusters={k}}}", False))
        rows.append((f"Hessian k-means K={k}", f"cluster-weights{{method=hessian-kmeans,clusters={k}}}", False))
    for bits in rates:
        rows.append((f"uniform {bits} bits", f"cluster-weights{{method=uniform,target-bits={bits}}}", False))
        rows.append((f"ECSQ {bits} bits", f"cluster-weights{{method=ecsq,clusters=64,target-bits={bits}}}", False))
    if not quick:
        # Choi et al.'s formulation (the per-weight Hessian weighs the assignment), for comparison.
        for bits in rates:
            rows.append((f"ECSQ {bits} bits, Hessian assignment", f"cluster-weights{{method=ecsq,clusters=64,target-bits={bits},assignment-weight=hessian}}", False))
    prune = PRUNE_SCHEDULE[model][-1][0]
    tune = f"{RECIPE_TUNE[model]},{RECIPE_FINISH}"
    for k in (16,) if quick else (8, 16):
        rows.append((f"pruned {prune} + Hessian k-means K={k}", f"cluster-weights{{method=hessian-kmeans,clusters={k}}},{RECIPE_FINISH}", True))
        rows.append((f"pruned {prune} + Hessian k-means K={k} + fine-tune", f"cluster-weights{{method=hessian-kmeans,clusters={k}}},{tune}", True))
    for bits in PRUNED_RATES[model][-1:] if quick else PRUNED_RATES[model]:
        rows.append((f"pruned {prune} + uniform grid {bits} bits + fine-tune", f"cluster-weights{{method=uniform,target-bits={bits},centres=grid}},{tune}", True))
        rows.append((f"pruned {prune} + ECSQ {bits} bits + fine-tune", f"cluster-weights{{method=ecsq,clusters=64,target-bits={bits}}},{tune}", True))
    return rows


def recipe_dir(setup: Setup) -> Path:
    return RESULTS / f"cb_{setup.name}_recipe"


def recipe_passes(setup: Setup) -> Path:
    """The recipe's --dump-dir (beside its output folder, which replaces itself when written)."""
    return RESULTS / f"cb_{setup.name}_recipe_passes"


def pruned_model(setup: Setup) -> Path:
    """The recipe's model after its last retraining (saved by --dump-dir)."""
    dumps = sorted(recipe_passes(setup).glob("*-finetune-weights.onnx"))
    return dumps[-1] if dumps else recipe_passes(setup) / "no-finetune-weights-dump.onnx"


def run_row(setup: Setup, label: str, passes: str, pruned: bool = False, *, out: Path | None = None, recipe: bool = False) -> Row:
    """One compile (from the float or the pruned model) and its `qc pack`; a ``recipe`` row also
    dumps every pass (the pruned rows start from its retrained model), is timed, and is verified
    on the lossless test images."""
    slug = "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()
    out = out or RESULTS / f"cb_{setup.name}_{slug}"
    source = pruned_model(setup) if pruned else setup.model
    pipeline = f"infer-shapes,fold-constants,{passes}"
    compile_argv = ["qc", "compile", rel(source), "--calib", rel(setup.train), "--data", rel(setup.test), "-o", rel(out), "--force", "--latency-runs", "0", "--pipeline", pipeline]
    if recipe:
        compile_argv += ["--dump-dir", rel(recipe_passes(setup))]
    commands = [compile_argv, ["qc", "pack", rel(out / "model.onnx"), "-o", rel(out / "model.qcz"), "--force"]]
    if recipe and setup.lossless is not None:
        commands.append(["qc", "verify", rel(setup.model), rel(out / "model.onnx"), "--data", rel(setup.lossless), "--latency-runs", "0", "--json", rel(out / "lossless.json")])
    show = [shell_line(argv) for argv in commands]
    row = Row(setup.name, label, pipeline, show)
    print(f"[{setup.name}] {label}" + "".join(f"\n    $ {c}" for c in show), flush=True)
    if pruned and not pruned_model(setup).exists():
        row.error = "no pruned model (the recipe row failed or did not run)"
        return row
    log = RESULTS / "logs" / f"cb_{setup.name}_{slug}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        for i, argv in enumerate(commands):
            started = time.perf_counter()
            status = subprocess.run([QC, *argv[1:]], cwd=REPO, stdout=fh, stderr=fh).returncode
            if i == 0:
                row.wall_minutes = (time.perf_counter() - started) / 60
            if status:
                row.error = f"exit {status}: {_tail(log)}"
                print(f"    FAILED ({rel(log)}): {row.error}", flush=True)
                return row
    report = json.loads((out / "report.json").read_text())
    v = report["verification"]
    row.accuracy_float, row.accuracy = v.get("accuracy_float"), v.get("accuracy_quantized")
    for p in report["passes"]:
        if p["name"] == "cluster-weights":
            row.cluster_seconds, row.entropy_bits = p["seconds"], p["stats"].get("entropy_bits")
        elif p["name"] in ("finetune-codebook", "finetune-weights"):
            row.finetune_seconds = (row.finetune_seconds or 0.0) + p["seconds"]
    if (out / "lossless.json").exists():
        lossless = json.loads((out / "lossless.json").read_text())["verification"]
        row.accuracy_lossless_float, row.accuracy_lossless = lossless.get("accuracy_float"), lossless.get("accuracy_quantized")
    import onnx

    from qcompiler.codebook.qcz import coded_size

    size = coded_size(onnx.load(str(out / "model.onnx")))
    row.ratio = size.ratio
    row.file_ratio = 4 * size.weights / (out / "model.qcz").stat().st_size
    against = "the pruned float model" if pruned else "float"
    extra = f", {row.wall_minutes:.1f} min" if recipe else ""
    if row.accuracy_lossless is not None:
        extra += f"; lossless test images {100 * row.accuracy_lossless:.2f} % (float {100 * row.accuracy_lossless_float:.2f} %)"
    print(f"    {row.ratio:.2f}x (file {row.file_ratio:.2f}x), top-1 {100 * row.accuracy:.2f} % (against {against} {100 * row.accuracy_float:.2f} %){extra}", flush=True)
    return row


def print_table(rows: list[Row]) -> None:
    head = f"{'model':<9} {'configuration':<46} {'ratio':>7} {'file':>7} {'H bits':>6} {'top-1 %':>7} {'Δ pts':>6} {'lossless %':>10} {'min':>5}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if r.error:
            print(f"{r.model:<9} {r.label:<46} FAILED: {r.error}")
        else:
            lossless = None if r.accuracy_lossless is None else 100 * r.accuracy_lossless
            minutes = r.wall_minutes if r.label == "recipe" else None
            print(f"{r.model:<9} {r.label:<46} {_f(r.ratio, '7.2f')} {_f(r.file_ratio, '7.2f')} {_f(r.entropy_bits, '6.2f')} {_f(100 * r.accuracy, '7.2f')} {_f(-r.drop_pts, '+6.2f')} "
                  f"{_f(lossless, '10.2f')} {_f(minutes, '5.1f')}")
        for c in r.commands:
            print(f"    $ {c}")
    print("ratio: 32 x weights / coded bits (Huffman indices + zero runs + codebook + tables); file: float32 weight bytes / .qcz bytes\n"
          "(the .qcz also holds biases, BatchNorm parameters and the graph). H bits: entropy of the indices per unpruned weight.\n"
          "lossless %: CIFAR-10's 1,000 lossless test images (float model beside it in the recipe's line above); min: the recipe's qc compile wall time.")


def kmeans_bound(plain: list[Row], ratio: float) -> Row | None:
    """The plain k-means row to beat at compression ``ratio``: the most compressed one not above it.

    Choi et al. compare the two at equal compression, and Hessian weighting buys a higher ratio at
    the same cluster count. Accuracy falls as the ratio rises, so k-means at ``ratio`` itself would
    be no more accurate than this row: beating it is enough, with no curve fitted between rows.
    None when every k-means row compresses more (no bound)."""
    below = [r for r in plain if r.ratio <= ratio]
    return max(below, key=lambda r: r.ratio) if below else None


def checks(rows: list[Row]) -> list[dict]:
    bars = Bars("model")
    print("\nbars:")
    for model in dict.fromkeys(r.model for r in rows):
        mine = {r.label: r for r in rows if r.model == model and not r.error}
        plain = [r for label, r in mine.items() if label.startswith("k-means K=")]
        for hessian in (r for label, r in mine.items() if label.startswith("Hessian k-means K=")):
            bound = kmeans_bound(plain, hessian.ratio)
            name = f"hessian>=kmeans@{hessian.label[16:]}"
            if bound is None:
                bars.add(model, name, None, None, f"{hessian.label} ({hessian.ratio:.2f}x): {100 * hessian.accuracy:.2f} %; every k-means row compresses more, no comparison")
                continue
            diff = 100 * (hessian.accuracy - bound.accuracy)
            bars.add(model, name, diff, diff >= 0, f"{hessian.label} ({hessian.ratio:.2f}x): {100 * hessian.accuracy:.2f} % vs {bound.label} ({bound.ratio:.2f}x, "
                     f"less compressed): {100 * bound.accuracy:.2f} % ({diff:+.2f} pts)")
        uniform_rows = {r.label[len("uniform "):]: r for label, r in mine.items() if label.startswith("uniform ") and label.endswith(" bits")}
        for rate, u in uniform_rows.items():
            e = mine.get(f"ECSQ {rate}")
            if e is not None:
                diff = 100 * (e.accuracy - u.accuracy)
                bars.add(model, f"ecsq>=uniform@{rate}", diff, diff >= 0, f"ECSQ {rate}: {100 * e.accuracy:.2f} % vs uniform {100 * u.accuracy:.2f} % ({diff:+.2f} pts; "
                         f"entropy {_f(e.entropy_bits, '.3f')} vs {_f(u.entropy_bits, '.3f')} bits)")
        recipe = mine.get("recipe")
        if recipe is None:
            bars.add(model, "recipe", None, None, "the recipe row failed or did not run")
        elif model == "resnet32":
            ok = recipe.ratio >= RESNET_RATIO_MIN and recipe.drop_pts <= RESNET_DROP_MAX and recipe.wall_minutes <= RESNET_MINUTES_MAX
            bars.add(model, "recipe", recipe.ratio, ok, f"{recipe.ratio:.2f}x at {recipe.drop_pts:.2f} pts lost in {recipe.wall_minutes:.1f} min "
                     f"(bar >= {RESNET_RATIO_MIN:.0f}x within {RESNET_DROP_MAX} pts in <= {RESNET_MINUTES_MAX:.0f} min)")
        else:
            ok = recipe.ratio >= LENET_RATIO_MIN and recipe.accuracy >= LENET_ACCURACY_MIN
            bars.add(model, "recipe", recipe.ratio, ok, f"{recipe.ratio:.2f}x at {100 * recipe.accuracy:.2f} % in {recipe.wall_minutes:.1f} min "
                     f"(bar >= {LENET_RATIO_MIN}x at >= {100 * LENET_ACCURACY_MIN:.2f} %, Choi et al.'s)")
        if model == "resnet32":
            timed = [r.cluster_seconds for r in mine.values() if r.label.startswith("k-means") and r.cluster_seconds is not None]
            if timed:
                bars.add(model, "cluster_seconds", max(timed), max(timed) <= CLUSTER_SECONDS_MAX, f"cluster-weights k-means, network scope: at most {max(timed):.1f} s per run (bar <= {CLUSTER_SECONDS_MAX:.0f} s)")
    print("\npublished (Choi et al. 2017, pruning + quantization + fine-tuning + Huffman), not measured here:")
    for name, ratio, acc in PUBLISHED:
        print(f"  {name:<20} {ratio:>7}  top-1 {acc}")
    return bars.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="lenet5,resnet32")
    parser.add_argument("--json", type=Path, default=RESULTS / "codebook.json")
    parser.add_argument("--recipe-only", action="store_true", help="only the one-command recipe row of each model")
    parser.add_argument("--rows", default=None, help="comma-separated label prefixes: only those rows, and no recipe (unpruned rows only)")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table and bars of an earlier run's --json file, compiling nothing")
    args = parser.parse_args()
    if args.from_json:
        rows = [Row(**{k: v for k, v in r.items() if k != "drop_pts"}) for r in json.loads(args.from_json.read_text())["rows"]]
        print_table(rows)
        sys.exit(exit_status(checks(rows)))
    start = time.perf_counter()
    mach = machine()
    for line in machine_lines(mach, spinning=False):
        print(line)
    rows = []
    for setup in prepare([m.strip() for m in args.models.split(",")], args.quick):
        prefixes = tuple(p.strip() for p in args.rows.split(",")) if args.rows else None
        recipe = None if prefixes else run_row(setup, "recipe", recipe_pipeline(setup.name), out=recipe_dir(setup), recipe=True)
        mine = [recipe] if recipe else []
        if not args.recipe_only:
            for label, passes, pruned in configurations(setup.name, args.quick):
                if prefixes and (pruned or not label.startswith(prefixes)):
                    continue
                row = run_row(setup, label, passes, pruned=pruned)
                # Accuracy is lost against the original float model, not the pruned one qc compared with.
                if pruned and row.accuracy is not None and recipe is not None and recipe.accuracy_float is not None:
                    row.accuracy_float = recipe.accuracy_float
                mine.append(row)
        rows.extend(mine)
    print_table(rows)
    results = checks(rows)
    print(f"\ntotal run time {time.perf_counter() - start:.0f} s")
    args.json.write_text(json.dumps({"machine": mach, "rows": [asdict(r) | {"drop_pts": r.drop_pts} for r in rows], "checks": results}, indent=2))
    print(f"wrote {rel(args.json)}")
    sys.exit(exit_status(results))


if __name__ == "__main__":
    main()
