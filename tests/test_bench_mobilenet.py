"""bench/mobilenet.py: a tiny-width MobileNetV2-style model exports with the nodes the bench relies on
(Clip(0, 6), depthwise Convs, BatchNormalization) and runs in onnxruntime as it does in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.helpers import load_script  # noqa: E402

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32


def _load_mobilenet():
    return load_script("bench/mobilenet.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Width 0.25, 32x32 input, 10 classes, last conv 64 channels; BN statistics from random images
    (no ../shared needed). Returns (module, torch model, onnx path, images)."""
    mb = _load_mobilenet()
    images = np.random.default_rng(0).standard_normal((16, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
    path = tmp_path_factory.mktemp("mobilenet") / "tiny.onnx"
    model = mb.export(path, width=0.25, resolution=RESOLUTION, bn_images=images, num_classes=10, last_channel=64)
    return mb, model, path, images


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
    return consts


def test_graph_has_clip06_depthwise_and_batchnorm(tiny) -> None:
    mb, torch_model, path, _ = tiny
    residuals = sum(1 for m in torch_model.modules() if getattr(m, "residual", False))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 13
    graph = model.graph
    consts = _constants(graph)
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    ops = [n.op_type for n in graph.node]

    clips = [n for n in graph.node if n.op_type == "Clip"]
    assert clips, ops
    for clip in clips:  # every ReLU6 as Clip(min=0, max=6) with constant bounds
        assert float(consts[clip.input[1]]) == 0.0 and float(consts[clip.input[2]]) == 6.0

    depthwise = 0
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if group > 1:
            out_ch, in_per_group = shapes[conv.input[1]][:2]
            assert out_ch == group and in_per_group == 1  # group == channels
            depthwise += 1
    # 17 inverted residual blocks, one depthwise conv each; 35 ReLU6: stem, 16 expand, 17 depthwise, final conv.
    assert depthwise == 17
    assert len(clips) == 35
    assert ops.count("BatchNormalization") == ops.count("Conv") == 52
    # Residual Adds where stride 1 and channels match: 10 at width 1.0, 11 at 0.25 (the first block's
    # 16 * 0.25 rounds up to its 8 input channels, as in torchvision).
    assert residuals == 11 and ops.count("Add") == residuals
    assert {"GlobalAveragePool", "Gemm"} <= set(ops)
    assert mb.graph_summary(path) == {"BatchNormalization": 52, "Clip(0,6)": 35, "Clip(other)": 0, "Conv": 52, "depthwise Conv": 17, "Add": 11}


def test_onnxruntime_matches_torch(tiny) -> None:
    mb, model, path, images = tiny
    assert mb.torch_vs_ort_sqnr(model, path, images) > 60.0


def test_bn_statistics_and_spread(tiny) -> None:
    """Running statistics come from the images (not the (0, 1) defaults) and gammas are spread, some dead."""
    import torch

    _, model, _, _ = tiny
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not torch.allclose(b.running_var, torch.ones_like(b.running_var)) for b in bns)
    gammas = torch.cat([b.weight.detach() for b in bns])
    assert (gammas < 0.01).any()  # dead channels
    assert gammas[gammas > 0.01].max() / gammas[gammas > 0.01].min() > 10  # per-channel ranges spread


def test_preprocess_upsamples_and_normalises() -> None:
    mb = _load_mobilenet()
    images = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    x = mb.preprocess(images, 64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 10, 10], (128 / 255 - mb.MEAN) / mb.STD, rtol=1e-5)
