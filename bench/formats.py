"""Number-format search (search-formats / qc search) on four networks, against the best uniform format, in one run.

    python bench/formats.py                        # LeNet-5, ResNet-20, ResNet-56, a CIFAR-sized MobileNet; speedups of 2 workers and Ray
    python bench/formats.py --models lenet --quick # a smoke check (few samples, two formats)
    python bench/formats.py --strategies           # exhaustive / binary / halving / predictor on a 57-design grid, per network and tolerance
    python bench/formats.py --strategies --write-predictor  # ... and ship the curve fitted on all networks as the built-in one

Each row is one `qc search` subprocess (its command printed beside it): the search measures its
candidates on 2,000 of the 10,000 test images (a seeded validation split: on their training images
the networks score ~100 %, so a drop measured there understates the drop on new images), then this
bench measures the model it wrote on the other 8,000, which the search never saw, in onnxruntime
with every optimization on, as a user runs it, and
reads the modelled energy from its report (`qc cost` prints the assumptions: Horowitz, ISSCC 2014,
45 nm). For the random-weight MobileNet the goal is an output SQNR and top-1 means agreement with
the float model.

With --strategies, one format per network is searched on a grid of designs like Hill et al.'s
(int<2..8> and float<e,m> for e 2..6, m 0..9) by each strategy at several top-1 tolerances. The
exhaustive search measures every design once (its optimum for every tolerance follows); Hill's
R^2 -> accuracy curve is fitted leave-one-model-out (each network's predictor runs with a curve
fitted on the others' measurements, written to bench/results/fmt_predictor_without_<net>.json).

Bars: the per-layer search's modelled energy at least 20 % below the best uniform format's at a
drop of at most 1 point on the test images; two worker processes at least 1.8x faster than one on
the same search; Ray within 15 % of the process pool. Hill et al.'s 7.6x is printed beside ours,
labelled published (their speedup, from a MAC-only model; ours counts memory too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from compare_ort import RESULTS, SHARED, _tail, cifar, machine, machine_lines, prepare_mobilenet, rel, run_measured, shell_line  # noqa: E402
from low_bit import _logits, _session  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QC = str(Path(sys.executable).parent / "qc")
PUBLISHED = "Hill et al. (ALGORITHMS.md section 2): 7.6x average speedup at 99 % normalized accuracy, one custom format per network, MAC model without memory (published, not measured here)"
DEFAULT_FORMATS = "int<2..8>|e4m3fn|e5m2|mxfp8|mxfp6|mxfp4|nvfp4|fp16"  # search-formats' default
#: The network-wide design grid the strategies search (Hill et al. searched 340 designs).
GRID = "int<2..8>|float<2..6,0..9>"
TOLERANCES = (0.5, 1.0, 2.0, 5.0)


@dataclass
class Net:
    name: str
    model: Path
    search_data: Path  # labelled training samples the strategies search on
    test: Path  # all test images (labels; for the random MobileNet, the float model's top-1)
    goal: list[str]  # --max-drop 1, or --min-sqnr N
    #: The per-layer comparison's split of the test images: the search runs on ``validation``
    #: (2,000 of them) and the written model is scored on ``held_out`` (the other 8,000). On
    #: training images the networks score ~100 %, so a 1-point drop there allowed 2.4 on test.
    validation: Path | None = None
    held_out: Path | None = None


@dataclass
class Row:
    net: str
    granularity: str
    command: str
    seconds: float | None = None
    formats: dict | None = None
    energy_pj: float | None = None
    best_uniform: str | None = None
    best_uniform_energy_pj: float | None = None
    energy_vs_fp32: float | None = None
    iso_area_speedup: float | None = None
    top1: float | None = None
    float_top1: float | None = None
    evaluations: int | None = None
    strategy_seconds: float | None = None
    error: str | None = None


def prepare(names: list[str], quick: bool) -> list[Net]:
    import train_lenet5_mnist as mnist

    RESULTS.mkdir(parents=True, exist_ok=True)
    count = 256 if quick else 2000
    nets = []
    for name in names:
        if name == "lenet":
            train, test = RESULTS / f"fmt_mnist_train{count}.npz", RESULTS / "lbt_mnist_test.npz"
            if not train.exists():
                full = mnist.make_npz("train")
                np.savez(train, input=full["input"][:count], labels=full["labels"][:count])
            if not test.exists():
                np.savez(test, **mnist.make_npz("test"))
            nets.append(Net("lenet", REPO / "models" / "mnist_lenet5.onnx", train, test, ["--max-drop", "1"]))
        elif name in ("resnet20", "resnet56"):
            train, test = RESULTS / f"fmt_cifar_train{count}.npz", RESULTS / "lb_test.npz"
            if not train.exists():
                full = cifar.make(SHARED / "data" / "cifar10_train_full.npz", None, shuffle=True, seed=0)
                np.savez(train, input=full["input"][:count], labels=full["labels"][:count])
            if not test.exists():
                np.savez(test, **cifar.make(SHARED / "data" / "cifar10_test.npz"))
            nets.append(Net(name, SHARED / "models" / f"cifar10_{name}.onnx", train, test, ["--max-drop", "1"]))
        elif name == "mobilenet":
            path, _, _ = prepare_mobilenet(0.5, 32)
            import onnxruntime as ort

            rng = np.random.default_rng(0)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            train, test = RESULTS / f"fmt_mobilenet_train{count}.npz", RESULTS / "fmt_mobilenet_test.npz"
            for file, n, seed in ((train, count, 1), (test, 2000 if not quick else 256, 2)):
                if not file.exists():
                    x = np.random.default_rng(seed).normal(0, 1, (n, 3, 32, 32)).astype(np.float32)
                    np.savez(file, **{feed: x, "labels": session.run(None, {feed: x})[0].argmax(1)})
            del rng
            nets.append(Net("mobilenet", path, train, test, ["--min-sqnr", "25"]))
        else:
            raise SystemExit(f"unknown network '{name}': choose from lenet, resnet20, resnet56, mobilenet")
    if not quick:
        for net in nets:
            if net.name != "mobilenet":
                net.validation, net.held_out = _split_test(net.name, net.test)
    return nets


def _split_test(name: str, test: Path, count: int = 2000) -> tuple[Path, Path]:
    """A seeded split of the test images: ``count`` to search on, the rest to score."""
    dataset = "mnist" if name == "lenet" else "cifar"
    validation, held_out = RESULTS / f"fmt_{dataset}_val{count}.npz", RESULTS / f"fmt_{dataset}_heldout.npz"
    if not validation.exists() or not held_out.exists():
        with np.load(test) as d:
            x, labels = d[[k for k in d.files if k != "labels"][0]], d["labels"]
        order = np.random.default_rng(7).permutation(len(labels))
        np.savez(validation, input=x[order[:count]], labels=labels[order[:count]])
        np.savez(held_out, input=x[order[count:]], labels=labels[order[count:]])
    return validation, held_out


def _top1(model: Path, data: Path) -> float:
    d = np.load(data)
    x = d[[k for k in d.files if k != "labels"][0]]
    return 100 * float(np.mean(_logits(_session(model), x).argmax(1) == d["labels"]))


def search_row(net: Net, granularity: str, formats: str, samples: int, extra: list[str] | None = None, tag: str = "") -> Row:
    out = RESULTS / f"fmt_{net.name}_{granularity}{tag}"
    argv = [QC, "search", rel(net.model), "--calib", rel(net.validation or net.search_data), "--formats", formats, "--granularity", granularity,
            "--samples", str(samples), *net.goal, "-o", rel(out), "--force", *(extra or [])]
    if "--min-sqnr" not in net.goal:
        argv += ["--min-sqnr", "0"]
    row = Row(net.name, granularity + tag, shell_line(["qc"] + argv[1:]))
    print(f"[{net.name} {granularity}{tag}] {row.command}", flush=True)
    status, row.seconds, _ = run_measured(argv, RESULTS / "logs" / f"{out.name}.log")
    if status not in (0, 1) or not (out / "model.onnx").exists():
        row.error = f"exit {status}: {_tail(RESULTS / 'logs' / f'{out.name}.log')}"
        print(f"    FAILED: {row.error}", flush=True)
        return row
    stats = next(p["stats"] for p in json.loads((out / "report.json").read_text())["passes"] if p["name"] == "search-formats")
    row.formats = stats["layers"]
    row.energy_pj, row.energy_vs_fp32, row.evaluations = stats["energy_pj"], stats["energy_vs_fp32"], stats["evaluations"]
    row.strategy_seconds = stats["strategy_seconds"]
    row.iso_area_speedup = stats["iso_area_speedup"]
    row.best_uniform = stats["best_uniform"]
    row.best_uniform_energy_pj = next((u["energy_pj"] for u in stats["uniform"] if u["format"] == stats["best_uniform"]), None)
    row.top1 = _top1(out / "model.onnx", net.held_out or net.test)
    print(f"    test top-1 {row.top1:.2f} %, energy {row.energy_pj / 1e6:.2f} uJ ({row.energy_vs_fp32:.2f}x below fp32), {row.seconds:.0f} s", flush=True)
    return row


def _search_stats(out: Path) -> dict:
    return next(p["stats"] for p in json.loads((out / "report.json").read_text())["passes"] if p["name"] == "search-formats")


def _run_search(net: Net, tag: str, argv_tail: list[str]) -> tuple[str, dict | None, float]:
    """One `qc search` on ``net`` with ``argv_tail``: (command line, its stats or None, wall seconds)."""
    out = RESULTS / f"fmt_{net.name}_{tag}"
    argv = [QC, "search", rel(net.model), "--calib", rel(net.search_data), "-o", rel(out), "--force", *argv_tail]
    command = shell_line(["qc"] + argv[1:])
    print(f"[{net.name} {tag}] {command}", flush=True)
    status, seconds, _ = run_measured(argv, RESULTS / "logs" / f"{out.name}.log")
    if status not in (0, 1) or not (out / "report.json").exists():
        print(f"    FAILED: exit {status}: {_tail(RESULTS / 'logs' / f'{out.name}.log')}", flush=True)
        return command, None, seconds
    return command, _search_stats(out), seconds


def _energy(stats: dict) -> dict[str, float]:
    return {u["format"]: u["energy_pj"] for u in stats["uniform"]}


def strategies(nets: list[Net], samples: int, write_predictor: bool) -> list[str]:
    """Every strategy on GRID for every network and tolerance against the exhaustive optimum; the
    predictor's curve fitted leave-one-model-out. Returns the bar lines."""
    from qcompiler.format_predictor import BUILTIN, AccuracyPredictor

    common = ["--formats", GRID, "--granularity", "network", "--samples", str(samples), "--min-sqnr", "0"]
    exhaustive, probes = {}, {}
    neutral = RESULTS / "fmt_predictor_neutral.json"
    # A placeholder that predicts every design misses: the predictor then probes every design.
    AccuracyPredictor(10.0, 0.0, ["none: a placeholder for collecting probes"]).save(neutral)
    for net in nets:
        # Exhaustive: every design measured once; its optimum at any tolerance follows from the table.
        command, stats, seconds = _run_search(net, "grid_exhaustive", [*common, "--strategy", "exhaustive", "--max-drop", "100"])
        if stats is None:
            continue
        exhaustive[net.name] = (command, stats, seconds)
        # The R^2 of every design on 10 inputs (what the predictor sees): a predictor run's probes.
        # (The curve only steers which designs it then measures in full; the probes are the same.)
        _, pstats, _ = _run_search(net, "grid_probes", [*common, "--strategy", "predictor", "--max-drop", "1", "--predictor", rel(neutral)])
        probes[net.name] = {t["format"]: t["r2"] for t in (pstats or {}).get("trail", []) if not t["full"] and t["samples"] <= 10}
    points: dict[str, list[tuple[float, float]]] = {}
    for name, (_, stats, _) in exhaustive.items():
        float_top1 = stats["float_top1"]
        r2 = probes.get(name, {})
        points[name] = [(r2[u["format"]], u["top1"] / float_top1) for u in stats["uniform"] if u["format"] in r2 and r2[u["format"]] is not None]
    curves = {}
    for name in exhaustive:
        others = [n for n in points if n != name and points[n]]
        xs = [p for n in others for p in points[n]]
        if len(xs) >= 3:
            curve = AccuracyPredictor.fit(np.array([x for x, _ in xs]), np.array([y for _, y in xs]), others)
            path = RESULTS / f"fmt_predictor_without_{name}.json"
            curve.save(path)
            curves[name] = path
    if write_predictor and sum(len(v) for v in points.values()) >= 3:
        everything = [p for v in points.values() for p in v]
        AccuracyPredictor.fit(np.array([x for x, _ in everything]), np.array([y for _, y in everything]), sorted(points)).save(BUILTIN)
        print(f"wrote {rel(BUILTIN)} (fitted on {', '.join(sorted(points))}: {len(everything)} designs)")

    print()
    print(f"one format per network over {GRID} ({len(next(iter(exhaustive.values()))[1]['uniform']) if exhaustive else 0} designs), "
          f"top-1 tolerances {', '.join(f'{t:g}' for t in TOLERANCES)} points; measured on {samples} held-out training samples as onnxruntime runs them")
    print(f"{'network':<10} {'tol':>4} {'strategy':<11} {'choice':<14} {'optimum':<14} {'same':>5} {'full':>5} {'probes':>6} {'search s':>9} {'vs exh.':>8}")
    agree, total, fast, within3, vacuous = 0, 0, [], 0, []
    bars = []
    for net in nets:
        if net.name not in exhaustive:
            continue
        command, stats, seconds = exhaustive[net.name]
        energy = _energy(stats)
        float_top1 = stats["float_top1"]
        print(f"{net.name:<10} {'all':>4} {'exhaustive':<11} {'':<14} {'':<14} {'':>5} {stats['full_evaluations']:5d} {stats['probes']:6d} {stats['strategy_seconds']:9.1f}")
        print(f"    $ {command}")
        for tol in TOLERANCES:
            meeting = [u for u in stats["uniform"] if float_top1 - u["top1"] <= tol]
            optimum = min(meeting, key=lambda u: u["energy_pj"])["format"] if meeting else None
            for strategy in ("binary", "halving", "predictor"):
                extra = ["--strategy", strategy, "--max-drop", f"{tol:g}"]
                if strategy == "predictor":
                    if net.name not in curves:
                        continue
                    extra += ["--predictor", rel(curves[net.name])]
                cmd, st, _ = _run_search(net, f"grid_{strategy}_{tol:g}", [*common, *extra])
                if st is None:
                    continue
                choice = st["best_uniform"]
                # Equal: the same design, or one of equal modelled energy.
                same = choice == optimum or (choice is not None and optimum is not None and energy.get(choice) == energy.get(optimum))
                ratio = stats["strategy_seconds"] / max(st["strategy_seconds"], 1e-9)
                print(f"{net.name:<10} {tol:4g} {strategy:<11} {choice or '-':<14} {optimum or '-':<14} {'yes' if same else 'NO':>5} {st['full_evaluations']:5d} {st['probes']:6d} {st['strategy_seconds']:9.1f} {ratio:7.1f}x")
                print(f"    $ {cmd}")
                if strategy == "predictor" and optimum is None:
                    vacuous.append(f"{net.name} {tol:g}")
                elif strategy == "predictor":
                    total += 1
                    agree += same
                    within3 += st["full_evaluations"] <= 3
                    fast.append(ratio)
    if total:
        share = agree / total
        bars.append(f"{'PASS' if share >= 0.9 else 'FAIL'}  predictor + refinement found the exhaustive optimum in {agree} of {total} (network, tolerance) settings ({share:.0%}; bar >= 90 %)"
                    + (f"; in {len(vacuous)} more no design meets the tolerance and it said so ({', '.join(vacuous)})" if vacuous else ""))
        bars.append(f"{'PASS' if within3 == total else 'FAIL'}  predictor: at most 3 full evaluations in {within3} of {total} settings")
        slowest = min(fast)
        bars.append(f"{'PASS' if slowest >= 20 else 'FAIL'}  predictor search time at least {slowest:.1f}x below exhaustive's (median {float(np.median(fast)):.1f}x; bar >= 20x)")
    return bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet,resnet20,resnet56,mobilenet")
    parser.add_argument("--quick", action="store_true", help="few samples and two formats: a smoke check")
    parser.add_argument("--no-speedups", action="store_true", help="skip the 1 vs 2 workers and Ray timings")
    parser.add_argument("--strategies", action="store_true", help="the strategies on the design grid (and only them)")
    parser.add_argument("--write-predictor", action="store_true", help="with --strategies: write the curve fitted on all networks as the built-in one")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    mach = machine()
    for line in machine_lines(mach, spinning=False):
        print(line)
    nets = prepare(args.models.split(","), args.quick)
    if args.strategies:
        bars = strategies(nets, 128 if args.quick else 1000, args.write_predictor)
        print()
        for bar in bars:
            print(bar)
        raise SystemExit(1 if any(bar.startswith("FAIL") for bar in bars) else 0)
    formats = "int8|int4" if args.quick else DEFAULT_FORMATS
    samples = 128 if args.quick else 1000
    rows: list[Row] = []
    floats = {net.name: _top1(net.model, net.held_out or net.test) for net in nets}
    for net in nets:
        for granularity in ("network", "layer"):
            row = search_row(net, granularity, formats, samples)
            row.float_top1 = floats[net.name]
            rows.append(row)
    timings: dict[str, float] = {}
    if not args.no_speedups and nets:
        net = next((n for n in nets if n.name == "resnet20"), nets[0])
        # The exhaustive search over the design grid: 1 worker (one thread) against 2, and Ray.
        grid = formats if args.quick else GRID
        for tag, extra in (("_w1", ["--workers", "1"]), ("_w2", ["--workers", "2"]), ("_ray2", ["--workers", "2", "--executor", "ray"])):
            start = time.perf_counter()
            row = search_row(net, "network", grid, samples, [*extra, "--strategy", "exhaustive"], tag)
            timings[tag] = time.perf_counter() - start if row.error is None else float("nan")
            timings[tag + "_search"] = row.strategy_seconds if row.error is None else float("nan")
    print()
    print("ort-cpu as run (ORT_ENABLE_ALL): top-1 on the 8,000 test images the search did not see; energy modelled (qc cost's table and rules)")
    print(f"{'network':<10} {'search':<14} {'formats chosen':<40} {'energy uJ':>9} {'vs fp32':>8} {'best uniform':>14} {'vs it':>6} {'speedup':>8} {'top-1':>7} {'drop':>6} {'evals':>6} {'s':>6}")
    bars = []
    for r in rows:
        if r.error:
            print(f"{r.net:<10} {r.granularity:<14} FAILED {r.error}")
            continue
        counts: dict[str, int] = {}
        for f in (r.formats or {}).values():
            counts[f] = counts.get(f, 0) + 1
        chosen = ", ".join(f"{f} x{n}" for f, n in sorted(counts.items(), key=lambda kv: -kv[1]))[:40]
        versus = r.best_uniform_energy_pj / r.energy_pj if r.best_uniform_energy_pj else float("nan")
        drop = r.float_top1 - r.top1
        print(f"{r.net:<10} {r.granularity:<14} {chosen:<40} {r.energy_pj / 1e6:9.2f} {r.energy_vs_fp32:7.2f}x {r.best_uniform or '-':>14} {versus:5.2f}x {r.iso_area_speedup:7.2f}x {r.top1:7.2f} {drop:6.2f} {r.evaluations:6d} {r.seconds:6.0f}")
        print(f"    $ {r.command}")
        if r.granularity == "layer":
            ok = drop <= 1.0 and versus >= 1.0 / 0.8
            bars.append(f"{'PASS' if ok else 'FAIL'}  {r.net}: per-layer energy {1 - 1 / versus:.0%} below the best uniform format ({r.best_uniform}) at a {drop:.2f}-point drop (bars: >= 20 %, <= 1 point)")
    print("(energy: MACs and weight reads; speedup: iso-area MAC throughput against fp32; both modelled, not measured)")
    print(f"\npublished: {PUBLISHED}")
    if timings:
        one, two, ray = timings.get("_w1_search"), timings.get("_w2_search"), timings.get("_ray2_search")
        print(f"\nexhaustive search time (the same search, the strategy's own seconds; each process's wall time in brackets): 1 worker {one:.1f} s ({timings['_w1']:.0f}), "
              f"2 workers {two:.1f} s ({timings['_w2']:.0f}), Ray with 2 CPUs {ray:.1f} s ({timings['_ray2']:.0f})")
        bars.append(f"{'PASS' if one / two >= 1.8 else 'FAIL'}  2 worker processes {one / two:.2f}x faster than 1 (bar >= 1.8x)")
        bars.append(f"{'PASS' if ray <= 1.15 * two else 'FAIL'}  Ray {ray / two:.2f}x the process pool's time (bar <= 1.15x)")
    print("the strategies (predictor, binary search, successive halving): python bench/formats.py --strategies")
    print()
    for bar in bars:
        print(bar)
    path = args.json or RESULTS / f"formats{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"machine": mach, "quick": args.quick, "rows": [asdict(r) for r in rows], "timings": timings}, indent=2))
    print(f"wrote {rel(path)}")
    raise SystemExit(1 if any(bar.startswith("FAIL") for bar in bars) else 0)


if __name__ == "__main__":
    main()
