"""bench/low_bit_training.py: every row's pipeline is one qc accepts, and the bars it prints
compare what they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcompiler.pipeline import parse_pipeline
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script("bench/low_bit_training.py")


@pytest.mark.parametrize("quick", [False, True])
def test_every_row_pipeline_parses(quick: bool) -> None:
    bench = _bench()
    specs = bench.specs(quick)
    assert {s.group for s in specs} == {"lenet", "resnet20-w2", "resnet20-w1", "resnet20-bits", "resnet20-bits-slb", "resnet20-uniform", "resnet20-cost"}
    for spec in specs:
        parse_pipeline(spec.pipeline)  # raises on an unknown pass or option


def test_bars(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    row = bench.Row
    floats = {"resnet20": row("resnet20-float", "g", "float", "", top1=81.0, average_bits=32.0, weight_bytes=1), "lenet": row("lenet-float", "lenet", "float", "", top1=99.3, average_bits=32.0, weight_bytes=1)}
    rows = [*floats.values(),
            row("lenet-w2a4-slb", "lenet", "w", "qc ...", top1=99.15, average_bits=2.0, weight_bytes=1),
            row("lenet-bits2", "lenet", "w", "qc ...", top1=99.1, average_bits=2.0, weight_bytes=1),
            row("resnet20-w2-slb", "g", "w", "qc ...", top1=78.0, average_bits=2.1, weight_bytes=1),
            row("resnet20-bits2.5", "g", "w", "qc ...", top1=80.2, average_bits=2.49, weight_bytes=1),
            row("resnet20-uniform2", "g", "w", "qc ...", top1=79.9, average_bits=2.0, weight_bytes=1),
            row("resnet20-w4-slb-1ep", "g", "w", "qc ...", top1=80.0, average_bits=4.0, weight_bytes=1, train_seconds_per_epoch=300, peak_memory_mib=1300),
            row("resnet20-w4-qat-1ep", "g", "w", "qc ...", top1=80.0, average_bits=4.0, weight_bytes=1, train_seconds_per_epoch=200, peak_memory_mib=1100)]
    bench.report(rows, floats, quick=False)
    out = capsys.readouterr().out
    assert "PASS  LeNet-5 W2A4" in out and "FAIL  LeNet-5 learn-bits" in out
    assert "FAIL  ResNet-20 W2A8 slb drop <= 2.5 pts" in out  # 3.0 points
    assert "PASS  ResNet-20 learn-bits <= 2.5 bits within 1.0" in out
    assert "FAIL  learn-bits 2.5 bits vs uniform 2-bit, same training: +0.30" in out
    assert "PASS  slb W4 peak memory 1300 MiB = 1.18x" in out and "PASS  slb W4 time per epoch 300 s = 1.50x" in out
    assert "published (resnet20; not measured here)" in out and "SLB (Yang et al. 2020)" in out
    assert "$ qc ..." in out
