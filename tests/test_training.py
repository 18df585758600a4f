"""The shared training loop's batching: every sample once per epoch, in a fresh order each time."""

from __future__ import annotations

import numpy as np

from qcompiler.data import DataSource
from qcompiler.training import shuffled_batches


def test_each_epoch_visits_every_sample_once_in_a_new_order() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    data = DataSource({"x": x}, np.arange(10))
    rng = np.random.default_rng(0)
    epochs = [[b for b in shuffled_batches(data, 4, rng)] for _ in range(2)]
    for batches in epochs:
        seen = np.concatenate([b["x"][:, 0] for b, _ in batches])
        labels = np.concatenate([l for _, l in batches])
        assert sorted(seen.tolist()) == list(range(10))
        assert np.array_equal(seen, labels)  # labels travel with their samples
    orders = [np.concatenate([b["x"][:, 0] for b, _ in batches]) for batches in epochs]
    assert not np.array_equal(orders[0], orders[1])


def test_a_fixed_batch_size_drops_the_remainder() -> None:
    data = DataSource({"x": np.zeros((10, 1), np.float32)})
    data.fixed_batch = 4
    batches = list(shuffled_batches(data, 64, np.random.default_rng(0)))
    assert [len(b["x"]) for b, _ in batches] == [4, 4] and all(l is None for _, l in batches)
