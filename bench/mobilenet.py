"""A MobileNetV2-style ONNX model (1000 classes) with seeded random weights made realistic, for the bench.

The shape is MobileNetV2's (Sandler et al. 2018): a 3x3 stride-2 stem, inverted residual blocks
(1x1 expand Conv + BN + ReLU6, 3x3 depthwise Conv + BN + ReLU6, 1x1 project Conv + BN, residual Add
when stride 1 and channels match), a final 1x1 Conv to 1280 channels + BN + ReLU6, global average
pooling and a Linear layer to 1000 classes; the width multiplier scales the channels as torchvision
does. What makes MobileNets hard to quantize is in there: depthwise convolutions (one 3x3 filter per
channel, so per-channel weight ranges vary widely), ReLU6 (exported as ONNX ``Clip(0, 6)``), and BN
layers whose channels have very different ranges, some of them all but dead.

Random weights, made to behave like trained ones where quantization cares:

1. Kaiming-normal convolutions (fan_out, as torchvision), Linear N(0, 0.01). The 3x3 filters (stem
   and depthwise) are made mostly low-frequency, as trained ones are (blobs and gradients): their
   projection on {1, x, y, Gaussian blob} plus 0.2 of the rest, at the same norm.
2. BN affine parameters with a random spread: log-normal gammas (sigma 0.5), betas before ReLU6 of
   gamma x N(1.0, 0.5) (most channels mostly active, some clipped at 6, some mostly zero), and 10 %
   "dead" channels (gamma ~1e-3, negative beta: always 0 after ReLU6) in the layers followed by
   ReLU6, as seen in trained MobileNets; after BN folding the per-channel weight ranges of the
   depthwise layers then differ by orders of magnitude, as in trained MobileNets.

   Why not plain random: a 52-layer random network with centred ReLU6 layers (beta ~ 0) and white
   3x3 filters on smooth (upsampled) images is chaotic. Every centred ReLU layer amplifies a
   perturbation by ~1.2x relative to the signal, and BN rescales the tiny high-frequency responses
   of white filters to unit variance; input noise at -40 dB left -2 dB at the logits, and any 8-bit
   quantization gave ~0 % top-1 agreement, whatever the tool. With the choices above, -40 dB input
   noise gives ~20 dB at the logits and per-tensor 8-bit activations ~17 dB (measured at 160x160).
3. BN running statistics re-estimated from natural images: a few hundred CIFAR-10 *training* images,
   bilinearly upsampled to the input size and normalised with the ImageNet mean/std, run through in
   train mode (``momentum=None``: the exact average over the batches). This comes after step 2 so
   that every BN's statistics match the activations it sees in eval mode; the other order would
   leave each layer's statistics describing inputs that the changed gammas no longer produce.
4. The classifier's bias centres the logits over those images (``b = -W mean(features)``). With
   random weights on uncentred pooled ReLU6 features, ~96 % of the logits' energy was the same for
   every image (9 distinct top-1 classes over 200 test images), so logit SQNR would mostly measure
   a constant; a trained classifier's logits depend on the input.

Exported with opset 17, ``do_constant_folding=False`` and eval mode, so BatchNormalization nodes stay
in the graph (folding them is the tools' job); ReLU6 becomes ``Clip`` with min 0 and max 6.

    python bench/mobilenet.py bench/results/mobilenet_w1_r224.onnx [--width 1.0] [--resolution 224]
    python bench/mobilenet.py --calib-out bench/results/calib_mobilenet_r224.npz --calib-count 128 [--resolution 224]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRAIN_NPZ = SHARED / "data" / "cifar10_train_full.npz"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # ImageNet mean/std, as the CIFAR-10 models use
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
OPSET = 17

#: MobileNetV2's inverted residual settings: expansion t, output channels c, repeats n, first stride s.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never 10 % below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _mostly_smooth(weight, residual: float):
    """3x3 filters projected onto the span of {1, x, y, Gaussian blob}, plus ``residual`` times the
    rest, at the original norm of each filter."""
    import torch

    yy, xx = torch.meshgrid(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0]), indexing="ij")
    basis, _ = torch.linalg.qr(torch.stack([torch.ones(3, 3), xx, yy, torch.exp(-(xx**2 + yy**2))]).reshape(4, 9).T)
    w = weight.reshape(-1, 9)
    low = (w @ basis) @ basis.T
    out = low + residual * (w - low)
    return (out * (w.norm(dim=1, keepdim=True) / out.norm(dim=1, keepdim=True).clamp_min(1e-12))).reshape(weight.shape)


def build(
    width: float = 1.0,
    *,
    num_classes: int = 1000,
    last_channel: int | None = None,
    seed: int = 0,
    gamma_sigma: float = 0.5,
    beta_ratio: tuple[float, float] = (1.0, 0.5),
    dead_fraction: float = 0.1,
    smooth_residual: float = 0.2,
):
    """The torch module with seeded random weights and spread BN affine parameters (steps 1-2 above);
    BN running statistics are still (0, 1): `calibrate_bn` sets them."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int, relu6: bool) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if relu6:
            layers.append(nn.ReLU6(inplace=False))
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = int(round(cin * expand))
            layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, 1, 1, relu6=True)]
            layers += [conv_bn(hidden, hidden, 3, stride, hidden, relu6=True), conv_bn(hidden, cout, 1, 1, 1, relu6=False)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cin = make_divisible(32 * width)
            last = last_channel if last_channel is not None else make_divisible(1280 * max(1.0, width))
            features = [conv_bn(3, cin, 3, 2, 1, relu6=True)]
            for t, c, n, s in SETTINGS:
                cout = make_divisible(c * width)
                for i in range(n):
                    features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            features.append(conv_bn(cin, last, 1, 1, 1, relu6=True))
            self.features = nn.Sequential(*features)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(last, num_classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    torch.manual_seed(seed)
    model = MobileNetV2()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.kernel_size == (3, 3):  # the stem and the depthwise filters: mostly low-frequency
                    m.weight.copy_(_mostly_smooth(m.weight, smooth_residual))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        for seq in (m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) >= 2 and isinstance(m[1], nn.BatchNorm2d)):
            bn, n = seq[1], seq[1].num_features
            gamma = torch.exp(gamma_sigma * torch.randn(n, generator=gen))  # log-normal: ranges spread per channel
            bn.weight.copy_(gamma)
            if len(seq) == 3:  # stem, expand, depthwise, final conv: followed by ReLU6
                bn.bias.copy_(gamma * (beta_ratio[0] + beta_ratio[1] * torch.randn(n, generator=gen)))
                dead = torch.rand(n, generator=gen) < dead_fraction
                bn.weight[dead] = 1e-3 * torch.rand(int(dead.sum()), generator=gen)
                bn.bias[dead] = -torch.rand(int(dead.sum()), generator=gen)  # always 0 after ReLU6
            else:  # the linear projection (no activation)
                bn.bias.copy_(0.5 * torch.randn(n, generator=gen))
    return model


def load_images(npz: str | Path, count: int, *, seed: int, skip: int = 0) -> np.ndarray:
    """``count`` images (uint8 NHWC) from a shared CIFAR-10 file: a seeded permutation's
    entries ``skip .. skip+count``, so two calls with different ``skip`` never share an image."""
    with np.load(npz) as data:
        images = data["images"]
    index = np.random.default_rng(seed).permutation(len(images))[skip : skip + count]
    return images[np.sort(index)]


def preprocess(images: np.ndarray, resolution: int, *, chunk: int = 256) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW at ``resolution`` x ``resolution``: /255, bilinear upsampling
    (torch ``interpolate``, ``align_corners=False``), then ImageNet mean/std per channel."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), 3, resolution, resolution), dtype=np.float32)
    mean, std = torch.from_numpy(MEAN).view(1, 3, 1, 1), torch.from_numpy(STD).view(1, 3, 1, 1)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + chunk].transpose(0, 3, 1, 2))).float() / 255.0
        if x.shape[-1] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        out[i : i + chunk] = ((x - mean) / std).numpy()
    return out


def calibrate_bn(model, images: np.ndarray, *, batch: int = 32) -> None:
    """Set every BN's running statistics to the exact average over ``images`` (float NCHW), in train mode."""
    import torch
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches seen
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(torch.from_numpy(images[i : i + batch]))
    model.eval()


def center_classifier(model, images: np.ndarray, *, batch: int = 64) -> None:
    """Step 4: the Linear layer's bias set to ``-W mean(pooled features over images)``."""
    import torch

    with torch.no_grad():
        pooled = torch.cat([torch.flatten(model.pool(model.features(torch.from_numpy(images[i : i + batch]))), 1) for i in range(0, len(images), batch)])
        model.classifier.bias.copy_(-model.classifier.weight @ pooled.mean(0))


def export(
    path: str | Path,
    *,
    width: float = 1.0,
    resolution: int = 224,
    seed: int = 0,
    bn_images: np.ndarray | int = 512,
    num_classes: int = 1000,
    last_channel: int | None = None,
):
    """Build (steps 1-3), export to ONNX with a dynamic batch, and return the eval-mode torch model.

    ``bn_images``: float NCHW images for the BN statistics, or how many CIFAR-10 training images
    to take (a seeded subset of ``cifar10_train_full.npz``, disjoint from `calibration_images`).
    """
    import torch

    path = Path(path)
    model = build(width, num_classes=num_classes, last_channel=last_channel, seed=seed)
    if isinstance(bn_images, int):
        bn_images = preprocess(load_images(TRAIN_NPZ, bn_images, seed=BN_SEED), resolution)
    calibrate_bn(model, bn_images)
    center_classifier(model, bn_images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(
        model,
        (torch.from_numpy(bn_images[:1]),),
        str(tmp),
        dynamo=False,
        opset_version=OPSET,
        training=torch.onnx.TrainingMode.EVAL,
        do_constant_folding=False,  # keep BatchNormalization nodes: folding them is the tools' job
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    tmp.replace(path)  # atomic: a half-written cache file is never picked up by the next run
    return model


# Seeds of the disjoint image sets drawn from the CIFAR-10 training split: one permutation, BN
# statistics from its first entries, calibration from the entries after them.
BN_SEED = 7
BN_COUNT = 512


def calibration_images(count: int, resolution: int) -> np.ndarray:
    """``count`` CIFAR-10 training images (after the BN-statistics images in the same permutation), preprocessed."""
    return preprocess(load_images(TRAIN_NPZ, count, seed=BN_SEED, skip=BN_COUNT), resolution)


def test_images(npz: str | Path, count: int, resolution: int) -> np.ndarray:
    """The first ``count`` images of a CIFAR-10 *test* file, preprocessed (held-out evaluation data)."""
    with np.load(npz) as data:
        return preprocess(data["images"][:count], resolution)


def graph_summary(path: str | Path) -> dict[str, int]:
    """Counts of what matters in the exported graph: BatchNormalization, Clip(0, 6), depthwise Conv."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    counts = {"BatchNormalization": 0, "Clip(0,6)": 0, "Clip(other)": 0, "Conv": 0, "depthwise Conv": 0, "Add": 0}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            counts["BatchNormalization"] += 1
        elif node.op_type == "Add":
            counts["Add"] += 1
        elif node.op_type == "Clip":
            lo = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            ok = lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 6.0
            counts["Clip(0,6)" if ok else "Clip(other)"] += 1
        elif node.op_type == "Conv":
            counts["Conv"] += 1
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            w = shapes.get(node.input[1])
            if group > 1 and w is not None and w[0] == group and w[1] == 1:
                counts["depthwise Conv"] += 1
    return counts


def torch_vs_ort_sqnr(model, path: str | Path, images: np.ndarray) -> float:
    """Logit SQNR (dB) of the exported ONNX in onnxruntime (ORT_ENABLE_ALL) against the eval-mode torch model."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": images})[0].astype(np.float64)
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy().astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(np.sum(ref**2) / noise))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", default=None, help="write the ONNX model here")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-out", default=None, help="write the calibration samples (CIFAR-10 training images, upsampled) here as ``input``")
    parser.add_argument("--calib-count", type=int, default=128)
    args = parser.parse_args(argv)
    if args.output is None and args.calib_out is None:
        parser.error("give an output model path, --calib-out, or both")
    if args.output:
        model = export(args.output, width=args.width, resolution=args.resolution, seed=args.seed, bn_images=BN_COUNT)
        check = torch_vs_ort_sqnr(model, args.output, test_images(SHARED / "data" / "cifar10_test.npz", 16, args.resolution))
        print(f"wrote {args.output}: {graph_summary(args.output)}; onnxruntime vs torch logit SQNR {check:.1f} dB")
    if args.calib_out:
        np.savez(args.calib_out, input=calibration_images(args.calib_count, args.resolution))
        print(f"wrote {args.calib_out}: {args.calib_count} CIFAR-10 training images at {args.resolution}x{args.resolution}")


if __name__ == "__main__":
    main(sys.argv[1:])
