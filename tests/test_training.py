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


class _ReadRecorder:
    """A sample array that records how many samples each read takes, and refuses to be read whole
    (what a calibration file too large for memory must never be)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.reads = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        part = self.array[index]
        self.reads.append(len(part))
        return part

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole calibration array was read at once")


def test_retraining_reads_the_data_batch_by_batch_never_whole() -> None:
    import onnx_ir as ir
    from qcompiler.targets.spec import load_target

    from qcompiler.pass_manager import PassContext
    from qcompiler.pipeline import parse_pipeline
    from tests.helpers import small_bn_cnn

    rng = np.random.default_rng(0)
    images = _ReadRecorder(rng.standard_normal((1200, 3, 8, 8)).astype(np.float32))
    data = DataSource({"input": images}, rng.integers(0, 5, 1200))
    model = small_bn_cnn()
    assert isinstance(model, ir.Model)
    ctx = PassContext(target=load_target("ort-cpu"), data=data)
    pipeline = "prune-magnitude{ratio=0.5},finetune-weights{epochs=2,batch-size=64,augment=crop-flip,loss=cross-entropy+kl},cluster-weights{method=uniform,target-bits=2},finetune-codebook{epochs=1,batch-size=64}"
    parse_pipeline(pipeline).run(model, ctx)
    # Training batches, and the Hessian's fixed sample count (1,000): never all 1,200 at once.
    assert max(images.reads) <= 1000
    # Every sample visited once per epoch (3 epochs).
    assert sum(r for r in images.reads if r <= 64) >= 3 * 1200
