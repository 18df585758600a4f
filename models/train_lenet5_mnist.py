"""Train the LeNet-5 that Choi et al. (2017) compress, on MNIST, and export it to ONNX.

    python models/train_lenet5_mnist.py                    # writes models/mnist_lenet5.onnx
    python models/train_lenet5_mnist.py --epochs 2 -o /tmp/lenet.onnx
    python models/train_lenet5_mnist.py --export-data data/   # the npz files qc compile reads

The network is Caffe's LeNet-5 variant the paper (and Deep Compression) used: conv 20@5x5, max
pool, conv 50@5x5, max pool, fully connected 500, ReLU, fully connected 10; 431k weights. Input
`input` float32 [N, 1, 28, 28], normalised as `preprocess` does; output `logits` [N, 10].

Data: ../shared/data/mnist.npz (x_train/y_train for training, x_test/y_test for the accuracy it
prints). Seeded, CPU only; about a minute per epoch on two cores. Needs torch
(`pip install -e ".[torch]"`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
MEAN, STD = 0.1307, 0.3081


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], normalised with MNIST's mean and std."""
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]


def make_npz(split: str, count: int | None = None, source: Path = MNIST) -> dict[str, np.ndarray]:
    """``{"input", "labels"}`` arrays of the first ``count`` images of ``split`` (train or test)."""
    with np.load(source) as data:
        x, y = data[f"x_{split}"], data[f"y_{split}"]
    x, y = (x[:count], y[:count]) if count else (x, y)
    return {"input": preprocess(x), "labels": y.astype(np.int64)}


def build():
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(20, 50, 5), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(800, 500), torch.nn.ReLU(), torch.nn.Linear(500, 10),
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "models" / "mnist_lenet5.onnx")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-data", type=Path, metavar="DIR", help="only write DIR/mnist_train.npz and DIR/mnist_test.npz (qc's --calib/--data format) and stop")
    args = parser.parse_args()
    if args.export_data:
        args.export_data.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            np.savez(args.export_data / f"mnist_{split}.npz", **make_npz(split))
        print(f"wrote {args.export_data / 'mnist_train.npz'} and {args.export_data / 'mnist_test.npz'}")
        return

    torch.manual_seed(args.seed)
    train, test = make_npz("train"), make_npz("test")
    x, y = torch.from_numpy(train["input"]), torch.from_numpy(train["labels"])
    net = build()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 128):
            batch = order[i : i + 128]
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(torch.from_numpy(test["input"][i : i + 1000])) for i in range(0, len(test["input"]), 1000)])
        accuracy = float((logits.argmax(1).numpy() == test["labels"]).mean())
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {100 * accuracy:.2f} % ({time.perf_counter() - start:.0f} s)", flush=True)
    net.eval()
    torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(args.output), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    print(f"wrote {args.output}: test accuracy {100 * accuracy:.2f} %")


if __name__ == "__main__":
    main()
