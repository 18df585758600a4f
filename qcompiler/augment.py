"""Random image augmentation for the training loop: shifted crops and horizontal flips.

Retraining after pruning recovers accuracy only if the training images still show the network
its errors. A calibration file is often a slice of the model's own training set, on which the
float network's loss is already near zero: retraining on those exact images fits them again and
generalises worse (ResNet-32, 80 % pruned, on 10k of its own CIFAR-10 training images: 80.5 %
against 82.6 % float). Random crops of the zero-padded image and mirror flips make every epoch's
images new to the network, the standard CIFAR recipe. Only 4-D float inputs (N, C, H, W) are
touched; flips are a separate choice because they break inputs such as digits or text.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

AugmentName = Literal["none", "crop", "crop-flip"]


def image_inputs(arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the inputs that look like image batches: float arrays of shape (N, C, H, W)."""
    return [k for k, a in arrays.items() if a.ndim == 4 and np.issubdtype(a.dtype, np.floating) and min(a.shape[2:]) >= 8]


def crop_padding(height: int, width: int) -> int:
    """How far a crop may shift: an eighth of the smaller side (4 pixels on 32x32, as for CIFAR)."""
    return max(min(height, width) // 8, 1)


def augment_batch(batch: dict[str, np.ndarray], kind: AugmentName, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``batch`` with every image input randomly shifted (zero padding) and, for crop-flip, mirrored.

    One gather per input: each sample's row and column indices into the padded batch, so the
    whole batch is augmented without a loop over samples or pixels.
    """
    if kind == "none":
        return batch
    out = dict(batch)
    for name in image_inputs(batch):
        images = batch[name]
        n, c, h, w = images.shape
        pad = crop_padding(h, w)
        padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        dy = rng.integers(0, 2 * pad + 1, size=n)
        dx = rng.integers(0, 2 * pad + 1, size=n)
        rows = dy[:, None] + np.arange(h)
        cols = np.arange(w)
        if kind == "crop-flip":
            flip = rng.random(n) < 0.5
            cols = np.where(flip[:, None], cols[::-1], cols)
        else:
            cols = np.broadcast_to(cols, (n, w))
        cols = dx[:, None] + cols
        out[name] = padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return out
