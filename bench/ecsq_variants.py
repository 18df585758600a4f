"""ECSQ variants against uniform quantization at equal index entropy on ResNet-32 (no pruning, no
fine-tuning): what `bench/notes/ecsq_resnet32.md` reports.

    python bench/ecsq_variants.py                                   # rates 1.5, 2, 3; uniform, layer-scale and unit ECSQ
    python bench/ecsq_variants.py --rates 1.4,1.45,1.55,1.6 --variants uniform,ecsq-unit
    python bench/ecsq_variants.py --bias-correction                 # each row's Conv/Gemm outputs made unbiased on training images
    python bench/ecsq_variants.py --first 2000 --samples 8000       # a disjoint slice of the test images

One network-wide codebook over every Conv/Gemm weight, BatchNorm left unfolded, as
`cluster-weights{scope=network}` does; the same clustering functions (`qcompiler/codebook/
clustering.py`) and the same entropy bisection. The Fisher diagonal (centres' importance) comes
from 1,000 of 2,000 seeded training images; accuracy is top-1 on the JPEG-decoded CIFAR-10 test images
as onnxruntime runs the float graph with the clustered weights (ORT_ENABLE_ALL; the compiled
model's Gather(codebook, indices) computes the same values). Each row also prints distortions:
the layer-scaled MSE (each layer's relative error, what `assignment-weight=layer-scale` weighs),
the Fisher-weighted relative MSE, the mean per-layer SQNR and the mean per-layer signed shrinkage
(mean of (w_q - w) sign(w) over mean |w|).

Variants: ``uniform`` (equal cells, Fisher-weighted centres: `method=uniform`), ``ecsq-layer``
(`method=ecsq,assignment-weight=layer-scale`, the default until 2026-12-08), ``ecsq-unit``
(`method=ecsq`, the default `assignment-weight=unit`),
``ecsq-hessian`` (Choi et al.'s per-weight Hessian in the assignment), ``ecsq-mse`` (cells from
ECSQ on plain squared error, then each centre moved to its cell's Fisher-weighted mean).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_ort import REPO, RESULTS, SHARED, cifar, machine, machine_lines  # noqa: E402

RESNET32 = SHARED / "models" / "cifar10_resnet32.onnx"
VARIANTS = ("uniform", "ecsq-layer", "ecsq-unit", "ecsq-hessian", "ecsq-mse")


def prepare(test_path: Path, train_path: Path) -> None:
    if not test_path.exists():
        np.savez(test_path, **cifar.make(SHARED / "data" / "cifar10_test.npz"))
    if not train_path.exists():
        # 2,000 training images (seeded): the Fisher diagonal and the bias correction's input
        # means come from them, never from the test images.
        np.savez(train_path, **cifar.make(SHARED / "data" / "cifar10_train_full.npz", 2000, shuffle=True, seed=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1.5,2.0,3.0")
    parser.add_argument("--variants", default="uniform,ecsq-layer,ecsq-unit")
    parser.add_argument("--samples", type=int, default=2000, help="test images scored")
    parser.add_argument("--first", type=int, default=0, help="index of the first test image scored")
    parser.add_argument("--bias-correction", action="store_true", help="correct each layer's mean output shift (the insert-qdq numerics) before scoring")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant '{v}': choose from {', '.join(VARIANTS)}")

    import onnx_ir as ir

    from qcompiler.codebook.clustering import _weighted_means, ecsq, entropy_bits, uniform
    from qcompiler.data import DataSource
    from qcompiler.hessian import HessianDiagonal, quantizable_weights
    from qcompiler.ir import NameAuthority, add_initializer, load_model, to_proto
    from qcompiler.op_roles import input_roles
    from qcompiler.pass_manager import PassContext
    from qcompiler.pipeline import parse_pipeline
    from qcompiler.quant.bias_correction import LayerInputMeans, corrected_bias, correctable_inputs
    from qcompiler.runtime import make_session
    from qcompiler.targets.spec import load_target

    sys.path.insert(0, str(REPO))
    from passes.cluster_weights import _search

    test_path, train_path = RESULTS / "lb_test.npz", RESULTS / "ecsq_train2000.npz"
    prepare(test_path, train_path)
    for line in machine_lines(machine(), False):
        print(line)
    train = np.load(train_path)
    data = DataSource({"input": train["input"]}, train["labels"])
    ctx = PassContext(target=load_target("ort-cpu"), data=data)
    model = parse_pipeline("infer-shapes,fold-constants").run(load_model(RESNET32), ctx).model
    fisher = HessianDiagonal(method="fisher", samples=1000).compute(model, ctx)
    names = [n for n in quantizable_weights(model) if model.graph.initializers[n].dtype == ir.DataType.FLOAT]
    weights = {n: model.graph.initializers[n].const_value.numpy() for n in names}
    w = np.concatenate([weights[n].ravel().astype(np.float64) for n in names])
    h = np.concatenate([np.maximum(fisher[n].ravel().astype(np.float64), 0.0) for n in names])
    h += 1e-6 * h.mean()  # the pass's floor
    layer = np.concatenate([np.full(weights[n].size, i) for i, n in enumerate(names)])
    layer_scale = np.concatenate([np.full(weights[n].size, 1.0 / np.mean(weights[n].astype(np.float64) ** 2)) for n in names])
    means = LayerInputMeans().compute(model, ctx) if args.bias_correction else None
    test = np.load(test_path)
    x = test["input"][args.first : args.first + args.samples]
    y = test["labels"][args.first : args.first + args.samples]

    def score(values: np.ndarray) -> float:
        clustered = model.clone()
        offsets = np.cumsum([0] + [weights[n].size for n in names])
        new = {n: values[offsets[i] : offsets[i + 1]].reshape(weights[n].shape).astype(np.float32) for i, n in enumerate(names)}
        for n, v in new.items():
            clustered.graph.initializers[n].const_value = ir.tensor(v, name=n)
        if means is not None:
            inputs, authority = correctable_inputs(clustered), NameAuthority(clustered.graph)
            for node in list(clustered.graph):
                roles = input_roles(node) if node.name in inputs else None
                if roles is None or node.inputs[roles.weight].name not in new:
                    continue
                name = node.inputs[roles.weight].name
                bias = corrected_bias(node, clustered, means[inputs[node.name].name], weights[name], new[name])
                if bias is None:
                    continue
                if roles.bias is not None and node.inputs[roles.bias] is not None:
                    node.inputs[roles.bias].const_value = ir.tensor(bias, name=node.inputs[roles.bias].name)
                else:
                    node.resize_inputs(3)
                    node.replace_input_with(2, add_initializer(clustered.graph, authority, f"{name}_bias", bias))
        session = make_session(to_proto(clustered), what="clustered ResNet-32")
        feed = session.get_inputs()[0].name
        predicted = np.concatenate([session.run(None, {feed: x[i : i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
        return 100.0 * float(np.mean(predicted == y))

    def cluster(variant: str, rate: float) -> tuple[np.ndarray, np.ndarray]:
        if variant == "uniform":
            centres, assignment, _ = _search(lambda step: uniform(w, h, step), rate, lo=1e-6 * np.ptp(w), hi=2 * np.ptp(w), pass_name="uniform")
        elif variant == "ecsq-mse":
            def mse_cells(lam: float) -> tuple[np.ndarray, np.ndarray]:
                ones = np.ones_like(w)
                centres, assignment = ecsq(w, ones, 64, lam, assign_importance=ones, iterations=100)
                return _weighted_means(w, h, assignment, centres), assignment

            centres, assignment, _ = _search(mse_cells, rate, lo=0.0, hi=10.0, pass_name="ecsq")
        else:
            assign = {"ecsq-layer": layer_scale, "ecsq-unit": np.ones_like(w), "ecsq-hessian": h}[variant]
            centres, assignment, _ = _search(lambda lam: ecsq(w, h, 64, lam, assign_importance=assign, iterations=100), rate, lo=0.0, hi=10.0, pass_name="ecsq")
        return centres, assignment

    per_layer_energy = np.bincount(layer, weights=w**2)
    print(f"\nResNet-32, one network-wide codebook over {len(w):,} weights; top-1 on test images {args.first}-{args.first + len(x) - 1}"
          + (", bias-corrected" if args.bias_correction else ""))
    print(f"float: {score(w):.2f} %")
    print(f"{'rate':>5} {'variant':<13} {'bits':>6} {'centres':>7} {'top-1 %':>8} {'layer-MSE':>9} {'Fisher-MSE':>10} {'SQNR dB':>8} {'shrink':>7} {'s':>5}")
    for rate in [float(r) for r in args.rates.split(",")]:
        for variant in variants:
            start = time.perf_counter()
            centres, assignment = cluster(variant, rate)
            q = centres[assignment]
            error = q - w
            relative = np.bincount(layer, weights=error**2) / per_layer_energy
            shrink = np.bincount(layer, weights=error * np.sign(w)) / np.bincount(layer, weights=np.abs(w))
            top1 = score(q)
            print(f"{rate:5.2f} {variant:<13} {entropy_bits(assignment, len(centres)):6.3f} {len(centres):7d} {top1:8.2f} {np.mean(layer_scale * error**2):9.4f} "
                  f"{np.mean(h * error**2) / np.mean(h * w**2):10.4f} {np.mean(-10 * np.log10(relative)):8.2f} {np.mean(shrink):+7.3f} {time.perf_counter() - start:5.1f}", flush=True)
    command = "python bench/ecsq_variants.py " + " ".join(sys.argv[1:])
    print(f"$ {command.strip()}")


if __name__ == "__main__":
    main()
