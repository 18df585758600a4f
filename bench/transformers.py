"""Transformers and sequence models through qc, against onnxruntime's own quantizers, in one run.

    python bench/transformers.py                 # encoder, decoder, LSTM: every tool, all rows
    python bench/transformers.py --models encoder --quick

Three networks are built here with torch (seeded random weights, no downloads) and exported to
ONNX (opset 17) as the exporters write them (MatMul + Add for linear layers, LayerNormalization,
Softmax, Erf-form GELU, an additive attention mask from an int64 mask input, Gather embeddings):

- ``encoder``: a MiniLM/BERT-style sentence encoder (vocab 2,000, 4 layers, hidden 256, 4 heads,
  FFN 1,024), inputs ``input_ids`` and ``attention_mask`` [batch, 32], output the mean-pooled
  embedding [batch, 256];
- ``decoder``: a GPT-style decoder (vocab 2,000, 4 layers, hidden 256, causal mask), output the
  next-token logits [batch, 32, 2,000];
- ``lstm``: an embedding, a two-layer LSTM (hidden 256) and a classifier [batch, 10].

Each is quantized by: ``qc compile --target ort-cpu`` (int8 weights per channel, uint8
activations, the accuracy guard on), ``qc compile --target ort-cpu-int4`` (weight-only int4
blocks of 32, MatMulNBits when onnxruntime fuses it), onnxruntime's ``quantize_dynamic`` (int8
weights, activations quantized at run time), ``quantize_static`` (QDQ, per-channel, MinMax, after
``quant_pre_process``) and its 4-bit ``MatMulNBitsQuantizer`` (RTN and HQQ, blocks of 32; GPTQ
where its optional dependency is installed). Calibration: 256 token sequences; evaluation: 256
other sequences (never the calibration ones), the float model's outputs against each quantized
model's as onnxruntime runs them with every graph optimization on. Cosine similarity: the mean
over samples of the cosine between flattened outputs; SQNR over all outputs. Latency: median of
the timed runs of a batch of 8, one session per model, default threads.

Bars (issue 17): encoder cosine >= 0.999 for qc int8 and >= 0.99 for qc weight-only int4, and qc
int8 at least as close to float as ``quantize_dynamic``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from compare_ort import RESULTS, machine, machine_lines, make_session, rel

VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS = 2000, 32, 256, 4, 1024, 4
CALIB, TEST, BATCH = 256, 256, 8


# --------------------------------------------------------------------------------------------
# the networks
# --------------------------------------------------------------------------------------------


def _torch_models():
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.out = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x, bias):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).split(HIDDEN, dim=-1)
            shape = (b, t, HEADS, HIDDEN // HEADS)
            q, k, v = (a.reshape(shape).transpose(1, 2) for a in (q, k, v))
            scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5 + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, HIDDEN)
            return self.out(ctx)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.ln1, self.ln2 = Attention(), nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.ff1, self.ff2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

        def forward(self, x, bias):
            x = self.ln1(x + self.attn(x, bias))
            return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(SEQ, HIDDEN)
            self.ln = nn.LayerNorm(HIDDEN)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

        def forward(self, input_ids, attention_mask):
            x = self.ln(self.tok(input_ids) + self.pos.weight[: input_ids.shape[1]])
            mask = attention_mask.to(torch.float32)
            bias = (1.0 - mask)[:, None, None, :] * -10000.0
            for block in self.blocks:
                x = block(x, bias)
            return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(SEQ, HIDDEN)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln, self.head = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)

        def forward(self, input_ids):
            t = input_ids.shape[1]
            x = self.tok(input_ids) + self.pos.weight[:t]
            causal = torch.triu(torch.full((t, t), -10000.0), diagonal=1)
            for block in self.blocks:
                x = block(x, causal)
            return self.head(self.ln(x))

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, HIDDEN)
            self.lstm = nn.LSTM(HIDDEN, HIDDEN, num_layers=2, batch_first=True)
            self.head = nn.Linear(HIDDEN, 10)

        def forward(self, input_ids):
            out, _ = self.lstm(self.tok(input_ids))
            return self.head(out[:, -1])

    return {"encoder": Encoder, "decoder": Decoder, "lstm": Recurrent}


def _tokens(n: int, seed: int, with_mask: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Zipf-like token frequencies, as in text: a few ids common, most rare.
    ids = np.minimum(rng.zipf(1.3, (n, SEQ)), VOCAB - 1).astype(np.int64)
    arrays = {"input_ids": ids}
    if with_mask:
        lengths = rng.integers(SEQ // 4, SEQ + 1, n)
        mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
        arrays["attention_mask"] = mask
        arrays["input_ids"] = np.where(mask == 1, ids, 0)
    return arrays


@dataclass
class Net:
    name: str
    model: Path
    calib: Path
    test: Path


def prepare(names: list[str]) -> list[Net]:
    import torch

    classes = _torch_models()
    nets = []
    for name in names:
        model_path = RESULTS / f"tf_{name}.onnx"
        calib, test = RESULTS / f"tf_{name}_calib.npz", RESULTS / f"tf_{name}_test.npz"
        with_mask = name == "encoder"
        if not model_path.exists():
            torch.manual_seed({"encoder": 1, "decoder": 2, "lstm": 3}[name])
            module = classes[name]().eval()
            example = {k: torch.from_numpy(v) for k, v in _tokens(2, 0, with_mask).items()}
            names_in = list(example)
            torch.onnx.export(module, tuple(example.values()), str(model_path), input_names=names_in, output_names=["output"],
                              dynamic_axes={k: {0: "batch"} for k in [*names_in, "output"]}, opset_version=17, dynamo=False)
        if not calib.exists():
            np.savez(calib, **_tokens(CALIB, 10, with_mask))
            np.savez(test, **_tokens(TEST, 20, with_mask))
        nets.append(Net(name, model_path, calib, test))
    return nets


# --------------------------------------------------------------------------------------------
# the tools
# --------------------------------------------------------------------------------------------


def _qc(net: Net, target: str) -> list[str]:
    out = RESULTS / f"tf_{net.name}_qc_{target}"
    return ["qc", "compile", rel(net.model), "--target", target, "--calib", rel(net.calib), "--data", rel(net.test), "-o", rel(out), "--force", "--latency-runs", "0"]


def _ort(net: Net, tool: str) -> list[str]:
    return [sys.executable, "bench/transformers.py", "--ort-tool", tool, rel(net.model), rel(net.calib), rel(RESULTS / f"tf_{net.name}_{tool}")]


TOOLS = {
    "qc int8 (ort-cpu)": lambda net: _qc(net, "ort-cpu"),
    "qc int4 weight-only (ort-cpu-int4)": lambda net: _qc(net, "ort-cpu-int4"),
    "ort quantize_dynamic": lambda net: _ort(net, "dynamic"),
    "ort quantize_static": lambda net: _ort(net, "static"),
    "ort MatMulNBits RTN": lambda net: _ort(net, "nbits-rtn"),
    "ort MatMulNBits HQQ": lambda net: _ort(net, "nbits-hqq"),
    "ort MatMulNBits GPTQ": lambda net: _ort(net, "nbits-gptq"),
}


def _reader(calib: Path, batch: int = 32):
    """onnxruntime's CalibrationDataReader over an .npz, a batch at a time (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(next(iter(arrays.values())))
    batches = [{k: a[i : i + batch] for k, a in arrays.items()} for i in range(0, n, batch)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    return Reader()


def run_ort_tool(tool: str, model: Path, calib: Path, out_dir: Path) -> None:
    """Quantize ``model`` with one of onnxruntime's quantizers into ``out_dir/model.onnx``."""
    import onnx
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    if tool == "dynamic":
        quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    elif tool == "static":
        pre = out_dir / "pre.onnx"
        quant_pre_process(str(model), str(pre))

        quantize_static(str(pre), str(out), _reader(calib), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        pre.unlink()
    else:
        from onnxruntime.quantization import matmul_nbits_quantizer as nb

        algo = tool.removeprefix("nbits-")
        if algo == "rtn":
            config = nb.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
        elif algo == "hqq":
            config = nb.HQQWeightOnlyQuantConfig(block_size=32)
        else:
            config = nb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(calib), block_size=32)
        quantizer = nb.MatMulNBitsQuantizer(onnx.load(str(model)), block_size=32, is_symmetric=True, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out))


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def _session(path: Path):
    # The other benches' options (all optimizations, intra-op spinning off), as the header says.
    return make_session(path, spinning=False)


def _outputs(session, test: Path) -> np.ndarray:
    with np.load(test) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(next(iter(arrays.values())))
    parts = [session.run(None, {k: a[i : i + 32] for k, a in arrays.items()})[0] for i in range(0, n, 32)]
    return np.concatenate(parts).astype(np.float64)


def _latency_ms(session, test: Path, runs: int) -> float:
    with np.load(test) as data:
        feed = {k: data[k][:BATCH] for k in data.files}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


@dataclass
class Row:
    net: str
    tool: str
    command: str
    cosine: float | None = None
    sqnr_db: float | None = None
    top1_agreement: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    seconds: float | None = None
    error: str | None = None


def _size_mb(path: Path) -> float:
    from qcompiler.ir import model_bytes_on_disk

    return model_bytes_on_disk(path) / 1e6


def measure(net: Net, tool: str, argv: list[str] | None, runs: int) -> Row:
    row = Row(net.name, tool, shlex.join(argv) if argv else f"(float model {rel(net.model)})")
    path = net.model
    if argv is not None:
        start = time.perf_counter()
        proc = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True)
        row.seconds = time.perf_counter() - start
        # qc exits 1 when the accuracy guard misses its goal but still writes the best model.
        out_dir = ROOT / argv[argv.index("-o") + 1] if "-o" in argv else ROOT / argv[-1]
        path = out_dir / "model.onnx"
        if proc.returncode not in (0, 1) or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            row.error = tail[-1][:200] if tail else f"exit {proc.returncode}"
            return row
    session = _session(path)
    reference = _outputs(_session(net.model), net.test)
    got = _outputs(session, net.test)
    a, b = reference.reshape(len(reference), -1), got.reshape(len(got), -1)
    row.cosine = float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))
    row.sqnr_db = float(10 * np.log10((reference**2).sum() / max(((reference - got) ** 2).sum(), 1e-30)))
    if net.name != "encoder":
        row.top1_agreement = float(np.mean(reference.argmax(-1) == got.argmax(-1)) * 100)
    row.latency_ms = _latency_ms(session, net.test, runs)
    row.size_mb = _size_mb(path)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-tool":
        run_ort_tool(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="encoder,decoder,lstm")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tool names (as in the table)")
    parser.add_argument("--quick", action="store_true", help="20 timed runs instead of 200")
    parser.add_argument("--json", type=Path, default=RESULTS / "transformers.json")
    args = parser.parse_args()
    mach = machine()
    for line in machine_lines(mach, spinning=False):
        print(line)
    runs = 20 if args.quick else 200
    tools = [t.strip() for t in args.tools.split(",")]
    rows: list[Row] = []
    for net in prepare(args.models.split(",")):
        rows.append(measure(net, "float", None, runs))
        for tool in tools:
            rows.append(measure(net, tool, TOOLS[tool](net), runs))
            r = rows[-1]
            print(f"  {net.name:<8} {tool:<36} {'FAILED ' + r.error if r.error else f'cos {r.cosine:.5f}  {r.sqnr_db:6.2f} dB  {r.latency_ms:7.2f} ms'}", flush=True)
    print()
    print(f"held-out: {TEST} sequences of {SEQ} tokens; latency: batch {BATCH}, median of {runs} runs, ORT_ENABLE_ALL")
    print(f"{'network':<8} {'tool':<36} {'cosine':>8} {'SQNR dB':>8} {'top-1 %':>8} {'ms':>7} {'vs float':>8} {'MB':>6}")
    floats = {r.net: r for r in rows if r.tool == "float"}
    for r in rows:
        if r.error:
            print(f"{r.net:<8} {r.tool:<36} FAILED: {r.error}")
            print(f"    $ {r.command}")
            continue
        agree = f"{r.top1_agreement:8.2f}" if r.top1_agreement is not None else f"{'-':>8}"
        speed = floats[r.net].latency_ms / r.latency_ms
        print(f"{r.net:<8} {r.tool:<36} {r.cosine:8.5f} {r.sqnr_db:8.2f} {agree} {r.latency_ms:7.2f} {speed:7.2f}x {r.size_mb:6.2f}")
        print(f"    $ {r.command}")
    bars = []
    by = {(r.net, r.tool): r for r in rows}
    enc8, enc4, dyn = by.get(("encoder", "qc int8 (ort-cpu)")), by.get(("encoder", "qc int4 weight-only (ort-cpu-int4)")), by.get(("encoder", "ort quantize_dynamic"))
    if enc8 and enc8.cosine is not None:
        bars.append(f"{'PASS' if enc8.cosine >= 0.999 else 'FAIL'}  encoder qc int8 cosine {enc8.cosine:.5f} (bar >= 0.999)")
        if dyn and dyn.cosine is not None:
            bars.append(f"{'PASS' if enc8.cosine >= dyn.cosine else 'FAIL'}  encoder qc int8 cosine {enc8.cosine:.5f} vs quantize_dynamic {dyn.cosine:.5f} (bar: at least as close)")
    if enc4 and enc4.cosine is not None:
        bars.append(f"{'PASS' if enc4.cosine >= 0.99 else 'FAIL'}  encoder qc weight-only int4 cosine {enc4.cosine:.5f} (bar >= 0.99)")
    print()
    for bar in bars:
        print(bar)
    # A run of some networks or tools replaces their rows only: the file keeps the others' last run.
    fresh = [asdict(r) for r in rows]
    done = {(r["net"], r["tool"]) for r in fresh}
    kept = []
    if args.json.exists():
        try:
            kept = [r for r in json.loads(args.json.read_text()).get("rows", []) if (r.get("net"), r.get("tool")) not in done]
        except (ValueError, AttributeError):
            kept = []
    args.json.write_text(json.dumps({"machine": mach, "rows": kept + fresh}, indent=1))
    print(f"wrote {rel(args.json)} ({len(fresh)} rows from this run, {len(kept)} kept from earlier runs)")
    raise SystemExit(1 if any(b.startswith("FAIL") for b in bars) else 0)


if __name__ == "__main__":
    main()
