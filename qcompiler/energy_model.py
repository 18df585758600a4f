"""Modelled energy of a network's multiply-accumulates and memory traffic, by number format.

Hill et al. reported speedups from a MAC model that counted no memory; their reviewers asked how
running time and power were computed. Here every figure comes from a table with its source
(`targets/energy/horowitz-45nm.toml`: Horowitz, ISSCC 2014, 45 nm) and every scaling rule is
stated where it is used:

- an integer multiply costs the table's int8 multiply times (bits_a x bits_b) / 64 (an array
  multiplier's partial products; the table's own int32 figure, 3.1 pJ, is within 4 % of that);
- a float multiply costs c x (significand_a x significand_b) + d, the line through the table's
  fp16 and fp32 multiplies (significands 11 and 24 bits, hidden bit included); an integer operand
  of a float multiply counts its bits as its significand;
- the accumulation is an int32 add after integer products, an fp32 add otherwise (what
  onnxruntime's kernels accumulate in); a block format adds its scale's share per MAC;
- memory: every weight bit is read once per inference and every activation bit read once and
  written once, at the table's per-64-bit access energy of where each lives (DRAM or SRAM);
- "iso-area speedup": MACs per unit area, taking a MAC's area proportional to its compute
  energy (both scale with the multiplier's partial products): fp32 MAC energy / format MAC energy.

Only the layers with weights (Conv, ConvTranspose, Gemm, MatMul with a constant operand) count:
element-wise ops, pooling and normalisation are left out, and the printed assumptions say so.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import onnx_ir as ir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qcompiler.cost_model import node_macs
from qcompiler.errors import QCError
from qcompiler.format_metadata import FORMAT_KEY, stored_format
from qcompiler.op_roles import input_roles
from qcompiler.quant.formats import BipolarFormat, BlockFormat, FixedFormat, FloatFormat, IntFormat, NumberFormat, parse_format

FP32 = parse_format("fp32")
_COMPUTE_KEYS = ("int8_add", "int8_mult", "int32_add", "int32_mult", "fp16_add", "fp16_mult", "fp32_add", "fp32_mult")
_MEMORY_KEYS = ("sram", "dram")


@dataclass(frozen=True)
class Figure:
    """One published energy, in picojoules, and where it comes from."""

    pj: float
    source: str


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation (``compute``) and per 64-bit access (``memory``), and where the
    weights and activations are read from."""

    name: str
    source: str
    compute: dict[str, Figure]
    memory: dict[str, Figure]
    weights_from: str = "dram"
    activations_from: str = "sram"
    path: str = ""

    # -- compute ------------------------------------------------------------------------------
    def _float_line(self) -> tuple[float, float]:
        """(c, d) of the float multiply's c x (sig_a x sig_b) + d through fp16 and fp32."""
        lo, hi = self.compute["fp16_mult"].pj, self.compute["fp32_mult"].pj
        c = (hi - lo) / (24 * 24 - 11 * 11)
        return c, lo - c * 11 * 11

    def multiply_pj(self, a: NumberFormat, b: NumberFormat) -> float:
        """Energy of one product of an ``a`` value and a ``b`` value."""
        (ka, wa), (kb, wb) = _multiplier_operand(a), _multiplier_operand(b)
        if ka == kb == "int":
            return self.compute["int8_mult"].pj * wa * wb / 64.0
        c, d = self._float_line()
        return c * wa * wb + d

    def accumulate_pj(self, a: NumberFormat, b: NumberFormat) -> float:
        """Energy of adding one product into the accumulator (int32 after integer products, else fp32)."""
        integer = _multiplier_operand(a)[0] == _multiplier_operand(b)[0] == "int"
        return self.compute["int32_add" if integer else "fp32_add"].pj

    def block_scale_pj(self, fmt: NumberFormat, other: NumberFormat) -> float:
        """A block format's scale applied once per block of products: its share per MAC."""
        if not isinstance(fmt, BlockFormat):
            return 0.0
        # A power-of-two scale is an exponent add; another scale is a multiply of the block's sum.
        per_block = self.compute["int8_add"].pj if fmt.scale.mantissa_bits == 0 else self.multiply_pj(fmt.scale, FP32)
        return per_block / fmt.block_size

    def mac_pj(self, weight: NumberFormat, activation: NumberFormat) -> float:
        """Energy of one multiply-accumulate of a ``weight`` value by an ``activation`` value."""
        return (self.multiply_pj(weight, activation) + self.accumulate_pj(weight, activation)
                + self.block_scale_pj(weight, activation) + self.block_scale_pj(activation, weight))

    # -- memory -------------------------------------------------------------------------------
    def bit_pj(self, where: str) -> float:
        """Energy of moving one bit to or from ``where`` (``sram`` or ``dram``)."""
        return self.memory[where].pj / 64.0

    def assumptions(self) -> list[str]:
        """The rules and figures a cost printout rests on, one line each."""
        c, d = self._float_line()
        lines = [f"energy table {self.name}: {self.source}" + (f" ({self.path})" if self.path else "")]
        lines += [f"  {key} = {fig.pj:g} pJ ({fig.source})" for key, fig in {**self.compute, **self.memory}.items()]
        lines += [
            f"integer multiply = int8_mult x (bits_a x bits_b) / 64 (gives int32 x int32 = {self.compute['int8_mult'].pj * 16:.2f} pJ; the table: {self.compute['int32_mult'].pj:g})",
            f"float multiply = {c:.5f} x (significand_a x significand_b) + {d:.3f} pJ (the line through fp16_mult and fp32_mult)",
            "accumulation: an int32 add after integer products, an fp32 add otherwise; a block format's scale adds its per-block operation / block size",
            f"memory: weights read once per inference from {self.weights_from.upper()}, activations read once and written once in {self.activations_from.upper()} (per 64 bits as above)",
            "only layers with weights (Conv, ConvTranspose, Gemm, MatMul) are counted; element-wise ops, pooling and normalisation are not",
            "iso-area speedup: fp32 MAC energy / the format's MAC energy (a MAC's area taken proportional to its compute energy)",
        ]
        return lines


def _multiplier_operand(fmt: NumberFormat) -> tuple[str, int]:
    """("int" or "float", the significand width the multiplier sees) of a format's values."""
    if isinstance(fmt, BlockFormat):
        return _multiplier_operand(fmt.element)
    if isinstance(fmt, (IntFormat, FixedFormat, BipolarFormat)):
        return "int", fmt.bits
    if isinstance(fmt, FloatFormat):
        return "float", fmt.mantissa_bits + 1
    raise TypeError(f"no multiplier model for {fmt!r}")


def _figure(value: object, where: str) -> Figure:
    if isinstance(value, dict) and set(value) <= {"pj", "source"} and "pj" in value:
        pj, source = value["pj"], value.get("source", "")
    else:
        raise QCError("expected { pj = NUMBER, source = \"...\" }", file=where)
    if isinstance(pj, bool) or not isinstance(pj, (int, float)) or not math.isfinite(pj) or pj < 0:
        raise QCError(f"expected a finite energy >= 0 pJ, got {pj!r}", file=where)
    if not isinstance(source, str) or not source.strip():
        raise QCError("every figure needs its source (source = \"...\")", file=where)
    return Figure(float(pj), source)


def load_energy_table(name_or_path: str) -> EnergyTable:
    """A built-in table by name (``horowitz-45nm``) or a .toml file of the same layout."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise QCError("energy table not found", file=str(path), option="energy")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise QCError("not valid TOML (not UTF-8 text)", file=str(path), option="energy") from None
    else:
        entry = resources.files("qcompiler.targets").joinpath("energy", f"{name_or_path}.toml")
        if not entry.is_file():
            known = sorted(p.name.removesuffix(".toml") for p in resources.files("qcompiler.targets").joinpath("energy").iterdir() if p.name.endswith(".toml"))
            raise QCError(f"unknown energy table '{name_or_path}' (built in: {', '.join(known)}; or give a .toml path)", option="energy")
        text, where = entry.read_text(encoding="utf-8"), f"energy/{name_or_path}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise QCError(f"not valid TOML: {exc}", file=where) from None
    for section, keys in (("compute", _COMPUTE_KEYS), ("memory", _MEMORY_KEYS)):
        table = data.get(section)
        if not isinstance(table, dict):
            raise QCError(f"missing [{section}] table", file=where)
        missing = [k for k in keys if k not in table]
        unknown = [k for k in table if k not in keys]
        if missing or unknown:
            raise QCError(f"[{section}] needs exactly {', '.join(keys)}" + (f" (missing: {', '.join(missing)})" if missing else "") + (f" (unknown: {', '.join(unknown)})" if unknown else ""), file=where)
    placement = data.get("placement", {})
    for key in ("weights", "activations"):
        if placement.get(key, "dram" if key == "weights" else "sram") not in _MEMORY_KEYS:
            raise QCError(f"expected one of {', '.join(_MEMORY_KEYS)}", file=f"{where}:placement.{key}")
    return EnergyTable(
        name=str(data.get("name", Path(where).stem)), source=str(data.get("source", "")),
        compute={k: _figure(data["compute"][k], f"{where}:compute.{k}") for k in _COMPUTE_KEYS},
        memory={k: _figure(data["memory"][k], f"{where}:memory.{k}") for k in _MEMORY_KEYS},
        weights_from=placement.get("weights", "dram"), activations_from=placement.get("activations", "sram"), path=where,
    )


@dataclass
class LayerEnergy:
    """One weight layer's modelled cost per sample."""

    node: str
    op_type: str
    macs: int
    weight_format: str
    activation_format: str
    output_format: str
    weight_bits: float
    activation_bits: float
    compute_pj: float
    memory_pj: float
    fp32_compute_pj: float
    fp32_memory_pj: float
    iso_area_speedup: float = field(default=1.0)

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.memory_pj


def _stored(value: ir.Value | None) -> tuple[ir.Node | None, ir.Value | None]:
    """(the node naming ``value``'s format, the constant it is computed from): a DequantizeLinear
    and its codes, or `format_lowering`'s emulations (a Cast, Mul or Max after the stored tensor)."""
    producer = value.producer() if value is not None else None
    named = producer if producer is not None and FORMAT_KEY in producer.metadata_props else None
    while producer is not None and producer.op_type in ("Cast", "Mul", "Max") and named is not None and producer.inputs and producer.inputs[0] is not None:
        source = producer.inputs[0]
        if source.producer() is None:
            return named, source
        producer = source.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        return named or producer, producer.inputs[0]
    return named, value


def _format_of(value: ir.Value | None) -> NumberFormat:
    """The format of what a layer reads through ``value``: its DequantizeLinear's (or emulation's), else the float type's."""
    node, _ = _stored(value)
    if node is not None:
        name = node.metadata_props.get(FORMAT_KEY)
        fmt = parse_format(name) if name is not None else (stored_format(node) if node.op_type == "DequantizeLinear" else None)
        if fmt is not None:
            return fmt
    dtype = value.dtype if value is not None else None
    if dtype == ir.DataType.FLOAT16:
        return parse_format("fp16")
    if dtype == ir.DataType.BFLOAT16:
        return parse_format("bf16")
    return FP32


def _output_format(value: ir.Value) -> NumberFormat:
    """The format a layer's output is written in: that of the QuantizeLinear right after it, if any."""
    for consumer in value.consumers():
        if consumer.op_type == "QuantizeLinear":
            for dq in consumer.outputs[0].consumers():
                if dq.op_type in ("DequantizeLinear", "Clip"):
                    target = dq if dq.op_type == "DequantizeLinear" else next(iter(dq.outputs[0].consumers()), None)
                    if target is not None and target.op_type == "DequantizeLinear":
                        return _format_of(target.outputs[0])
    return _format_of(value) if value.producer() is not None and value.producer().op_type == "DequantizeLinear" else FP32


def _weight_shape(value: ir.Value) -> tuple[int, ...] | None:
    _, source = _stored(value)
    const = source.const_value if source is not None else None
    return tuple(const.shape) if const is not None else None


def _elements(value: ir.Value) -> int | None:
    dims = list(value.shape)[1:] if value.shape is not None else None
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def _layer_elements(node: ir.Node, x_value: ir.Value, w_shape: tuple[int, ...], macs: int) -> tuple[int, int]:
    """Elements per sample of a layer's input and output. A Gemm or MatMul input whose shape a
    dynamic Reshape hid is its MACs over its output features."""
    y = _elements(node.outputs[0])
    x = _elements(x_value)
    if x is None and node.op_type in ("Gemm", "MatMul") and len(w_shape) == 2:
        trans_b = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
        outputs = w_shape[0] if trans_b else w_shape[1]
        x = macs // outputs  # MACs = rows x inputs x outputs
    if x is None or y is None:
        missing = x_value.name if x is None else node.outputs[0].name
        raise QCError(f"'{missing}' has no static shape beyond the batch: qc cost needs one", node=node.name)
    return x, y


def _bits(fmt: NumberFormat) -> float:
    return float(fmt.bits)


def layer_energies(model: ir.Model, table: EnergyTable) -> list[LayerEnergy]:
    """The modelled energy of every weight layer of ``model`` (float or quantized), per sample."""
    rows = []
    fp32_mac = table.mac_pj(FP32, FP32)
    for node in model.graph:
        roles = input_roles(node)
        if roles.weight is None or roles.weight >= len(node.inputs) or node.inputs[roles.weight] is None or not roles.activations:
            continue
        w_value, x_value = node.inputs[roles.weight], node.inputs[roles.activations[0]]
        shape = _weight_shape(w_value)
        if shape is None or x_value is None:
            continue
        macs = node_macs(node, shape)
        w_fmt, x_fmt, y_fmt = _format_of(w_value), _format_of(x_value), _output_format(node.outputs[0])
        params = math.prod(shape)
        x_elems, y_elems = _layer_elements(node, x_value, shape, macs)
        weight_bits = params * _bits(w_fmt)
        activation_bits = x_elems * _bits(x_fmt) + y_elems * _bits(y_fmt)
        mac = table.mac_pj(w_fmt, x_fmt)
        rows.append(LayerEnergy(
            node=node.name, op_type=node.op_type, macs=macs, weight_format=w_fmt.name, activation_format=x_fmt.name, output_format=y_fmt.name,
            weight_bits=weight_bits, activation_bits=activation_bits,
            compute_pj=macs * mac,
            memory_pj=weight_bits * table.bit_pj(table.weights_from) + activation_bits * table.bit_pj(table.activations_from),
            fp32_compute_pj=macs * fp32_mac,
            fp32_memory_pj=params * 32 * table.bit_pj(table.weights_from) + (x_elems + y_elems) * 32 * table.bit_pj(table.activations_from),
            iso_area_speedup=fp32_mac / mac,
        ))
    return rows


@dataclass(frozen=True)
class EnergyTotals:
    """Sums over the layers, and their ratios to the same network in fp32."""

    macs: int
    compute_pj: float
    memory_pj: float
    fp32_compute_pj: float
    fp32_memory_pj: float
    iso_area_speedup: float

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.memory_pj

    @property
    def fp32_total_pj(self) -> float:
        return self.fp32_compute_pj + self.fp32_memory_pj


def totals(rows: list[LayerEnergy]) -> EnergyTotals:
    macs = sum(r.macs for r in rows)
    compute = sum(r.compute_pj for r in rows)
    fp32_compute = sum(r.fp32_compute_pj for r in rows)
    return EnergyTotals(
        macs=macs, compute_pj=compute, memory_pj=sum(r.memory_pj for r in rows),
        fp32_compute_pj=fp32_compute, fp32_memory_pj=sum(r.fp32_memory_pj for r in rows),
        # MAC-weighted: the time an iso-area array spends, fp32 over the formats'.
        iso_area_speedup=fp32_compute / compute if compute > 0 else 1.0,
    )
