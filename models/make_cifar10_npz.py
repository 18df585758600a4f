"""Make qcompiler .npz data files from the shared CIFAR-10 arrays.

    python models/make_cifar10_npz.py ../shared/data/cifar10_train_subset.npz models/cifar10_calib.npz --count 256 --shuffle
    python models/make_cifar10_npz.py ../shared/data/cifar10_test.npz test2000.npz --count 2000
    python models/make_cifar10_npz.py ../shared/data/cifar10_train_full.npz data/cifar10_train50k.npz --shuffle --uncompressed

The output holds ``input`` (float32 [N,3,32,32], normalised as the CIFAR-10 ResNets expect) and
``labels`` (int64 [N]). The bundled ``models/cifar10_calib.npz`` was made by the first command
(256 training images, never test images). ``--uncompressed`` writes with ``numpy.savez``: qc then
memory-maps the file in place (the 50,000 training images are 614 MB as float32) instead of
inflating it into a temporary file first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, scaled to [0,1] and normalised per channel."""
    x = images.astype(np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def make(source: str | Path, count: int | None = None, *, shuffle: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """The first ``count`` samples (or a seeded random ``count`` with ``shuffle``) of a shared file."""
    with np.load(source) as data:
        images, labels = data["images"], data["labels"]
    index = np.arange(len(images))
    if shuffle:
        index = np.random.default_rng(seed).permutation(len(images))
    index = np.sort(index[:count]) if count else index
    return {"input": preprocess(images[index]), "labels": labels[index].astype(np.int64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("output")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--shuffle", action="store_true", help="a seeded random subset instead of the first samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uncompressed", action="store_true", help="write with numpy.savez, which qc memory-maps in place")
    args = parser.parse_args()
    arrays = make(args.source, args.count, shuffle=args.shuffle, seed=args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    (np.savez if args.uncompressed else np.savez_compressed)(args.output, **arrays)
    print(f"wrote {args.output}: input {arrays['input'].shape}, labels {arrays['labels'].shape}")


if __name__ == "__main__":
    main()
