"""A ResNet-18-shaped ONNX model (224x224, 1000 classes) with seeded random weights, for latency.

No pretrained weights are needed to compare kernels: the shape of the network (convolutions,
residual adds, pooling, one Gemm) decides what onnxruntime fuses and how fast it runs. The weights
are seeded random, and the BatchNorm layers get non-trivial running statistics and affine
parameters so that BN folding actually changes the weights.

    python bench/resnet18.py bench/results/resnet18.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

INPUT_SHAPE = (3, 224, 224)


def _build(seed: int):
    """The standard torchvision-style ResNet-18 (BasicBlock, [2, 2, 2, 2]), seeded init."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                # Projection shortcut (1x1 conv + BN), as in torchvision's ResNet-18.
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(seed)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            # Non-trivial affine parameters: with gamma=1, beta=0 folding would be almost a no-op.
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return model


def export(path: str | Path, *, seed: int = 0, stat_batches: int = 4, stat_batch_size: int = 8) -> Path:
    """Build, give BN real running statistics, and export to ONNX (opset 17, dynamic batch)."""
    import torch
    from torch import nn

    path = Path(path)
    model = _build(seed)
    # Running statistics from a few training-mode passes on random data. momentum=None makes them
    # the exact cumulative average of the batches seen, instead of 10 % of the way from (0, 1).
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(stat_batches):
            model(torch.randn(stat_batch_size, *INPUT_SHAPE, generator=gen))
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(
        model,
        (torch.randn(1, *INPUT_SHAPE, generator=gen),),
        str(tmp),
        dynamo=False,
        opset_version=17,
        do_constant_folding=False,  # keep BatchNormalization nodes: folding them is the tools' job
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    tmp.replace(path)  # atomic: a half-written cache file is never picked up by the next run
    return path


def random_inputs(count: int, seed: int) -> np.ndarray:
    """A fixed, seeded set of standard-normal inputs [count, 3, 224, 224] float32."""
    return np.random.default_rng(seed).standard_normal((count, *INPUT_SHAPE), dtype=np.float32)


if __name__ == "__main__":
    print(f"wrote {export(sys.argv[1] if len(sys.argv) > 1 else 'bench/results/resnet18.onnx')}")
