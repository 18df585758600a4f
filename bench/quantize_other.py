"""Quantize an ONNX model with onnxruntime's or NNCF's post-training quantizer (baselines for qcompiler).

    python bench/quantize_other.py ort    MODEL.onnx CALIB.npz OUT_DIR   # quantize_static, its defaults (8-bit weights)
    python bench/quantize_other.py ort-rr MODEL.onnx CALIB.npz OUT_DIR   # the same with reduce_range=True (7-bit weights)
    python bench/quantize_other.py nncf   MODEL.onnx CALIB.npz OUT_DIR

``ort-rr`` quantizes the weights to 7 bits ([-64, 63]): onnxruntime's u8s8 kernels on x86 CPUs without
VNNI sum pairs of uint8 x int8 products in int16 (VPMADDUBSW), which saturates with full 8-bit
weights; reduce_range is onnxruntime's own remedy, at the cost of one bit of weight precision.

CALIB.npz holds the calibration samples as an array named ``input`` (the same file ``qc compile
--calib`` reads). Writes OUT_DIR/model.onnx and OUT_DIR/timing.json (``{"seconds": ...}``: loading
the data plus quantizing, after the imports, the same span that qcompiler's ``compile_seconds`` covers).
`compare_ort.py` runs this in a subprocess so that each tool's peak memory is measured on its own.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# onnxruntime's calibration batch. MinMax takes the min/max over all batches, so the batch size
# does not change the result, only the speed.
ORT_CALIB_BATCH = 32


def _samples(calib: Path) -> np.ndarray:
    with np.load(calib) as data:
        return data["input"]


def quantize_ort(model: Path, calib: Path, out_dir: Path, *, reduce_range: bool = False) -> None:
    """onnxruntime's recommended flow: quant_pre_process (shape inference + BN folding), then
    quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration;
    ``reduce_range``: 7-bit weights."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class NpzReader(CalibrationDataReader):
        def __init__(self, samples: np.ndarray) -> None:
            self._batches: Iterator[np.ndarray] = (samples[i : i + ORT_CALIB_BATCH] for i in range(0, len(samples), ORT_CALIB_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    samples = _samples(calib)
    preprocessed = out_dir / "preprocessed.onnx"
    quant_pre_process(str(model), str(preprocessed))
    quantize_static(
        str(preprocessed),
        str(out_dir / "model.onnx"),
        NpzReader(samples),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        reduce_range=reduce_range,
    )


def quantize_nncf(model: Path, calib: Path, out_dir: Path) -> None:
    """nncf.quantize with its defaults, one sample per item (how NNCF expects its dataset), on the
    model after onnxruntime's quant_pre_process, as for ``ort``: NNCF's ONNX backend does not fold
    BatchNormalization, and with the BN nodes left in (the bench's float models keep them) Q/DQ
    brackets Conv -> BN pairs that onnxruntime cannot fuse, so the model ran 2-7x slower than float."""
    import nncf
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    samples = _samples(calib)
    preprocessed = out_dir / "preprocessed.onnx"
    quant_pre_process(str(model), str(preprocessed))
    dataset = nncf.Dataset([samples[i : i + 1] for i in range(len(samples))], lambda x: {"input": x})
    quantized = nncf.quantize(onnx.load(str(preprocessed)), dataset, subset_size=len(samples))
    onnx.save(quantized, str(out_dir / "model.onnx"))


def quantize_ort_reduce_range(model: Path, calib: Path, out_dir: Path) -> None:
    quantize_ort(model, calib, out_dir, reduce_range=True)


TOOLS = {"ort": quantize_ort, "ort-rr": quantize_ort_reduce_range, "nncf": quantize_nncf}


def main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[0] not in TOOLS:
        sys.exit(__doc__)
    tool, model, calib, out_dir = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    TOOLS[tool](model, calib, out_dir)
    seconds = time.perf_counter() - start
    (out_dir / "timing.json").write_text(json.dumps({"tool": tool, "seconds": seconds}))
    print(f"{tool}: wrote {out_dir / 'model.onnx'} in {seconds:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
