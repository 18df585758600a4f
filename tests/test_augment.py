"""Image augmentation for retraining: every augmented sample is a shifted window of its zero-padded
image (mirrored for crop-flip), non-image inputs pass through, and the batch is a fresh draw."""

from __future__ import annotations

import numpy as np

from qcompiler.augment import augment_batch, crop_padding, image_inputs


def _windows(image: np.ndarray, pad: int) -> list[tuple[int, int, np.ndarray]]:
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    return [(dy, dx, padded[:, dy : dy + h, dx : dx + w]) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]


def _batch(n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(n, 3, 16, 12)).astype(np.float32), "mask": rng.normal(size=(n, 5)).astype(np.float32)}


def test_crop_shifts_each_sample_within_the_padding() -> None:
    batch = _batch()
    out = augment_batch(batch, "crop", np.random.default_rng(1))
    pad = crop_padding(16, 12)
    assert pad == 1 and out["image"].shape == batch["image"].shape and out["image"].dtype == np.float32
    offsets = set()
    for original, augmented in zip(batch["image"], out["image"]):
        matches = [(dy, dx) for dy, dx, window in _windows(original, pad) if np.array_equal(window, augmented)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) == (2 * pad + 1) ** 2  # every shift is drawn
    assert out["mask"] is batch["mask"]


def test_crop_flip_mirrors_about_half_the_samples() -> None:
    batch = _batch(200)
    out = augment_batch(batch, "crop-flip", np.random.default_rng(2))
    pad = crop_padding(16, 12)
    flipped = 0
    for original, augmented in zip(batch["image"], out["image"]):
        plain = any(np.array_equal(window, augmented) for _, _, window in _windows(original, pad))
        mirrored = any(np.array_equal(window, augmented) for _, _, window in _windows(original[:, :, ::-1], pad))
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 60 < flipped < 140


def test_none_returns_the_batch_and_only_image_shaped_float_inputs_count() -> None:
    batch = _batch()
    assert augment_batch(batch, "none", np.random.default_rng(0)) is batch
    assert image_inputs(batch) == ["image"]
    assert image_inputs({"ids": np.zeros((4, 1, 16, 16), np.int64), "small": np.zeros((4, 3, 6, 6), np.float32)}) == []
    assert crop_padding(32, 32) == 4 and crop_padding(28, 28) == 3
