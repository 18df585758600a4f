"""Load a target description (TOML) into a frozen, validated `TargetSpec`.

Passes ask the spec (``ctx.target.weights.granularity``), never the target's name. Every key of the
file is checked: an unknown key or a bad value fails with ``file:key: message``. A user's file may
``extends = "ort-cpu"`` (a built-in name or a path relative to the file) and override keys.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import onnx_ir as ir

from qcompiler.errors import QCError

BUILTIN_DIR = Path(__file__).parent

INTEGER_DTYPES = {
    # name: (qmin, qmax, bits, signed)
    "int4": (-8, 7, 4, True),
    "uint4": (0, 15, 4, False),
    "int8": (-128, 127, 8, True),
    "uint8": (0, 255, 8, False),
    "int16": (-32768, 32767, 16, True),
    "uint16": (0, 65535, 16, False),
    "int32": (-(2**31), 2**31 - 1, 32, True),
}
#: ONNX element type of each dtype name, and (bits, signed) of each integer element type.
IR_TYPES: dict[str, ir.DataType] = {
    "int4": ir.DataType.INT4, "uint4": ir.DataType.UINT4, "int8": ir.DataType.INT8, "uint8": ir.DataType.UINT8,
    "int16": ir.DataType.INT16, "uint16": ir.DataType.UINT16, "int32": ir.DataType.INT32,
    "float8e4m3fn": ir.DataType.FLOAT8E4M3FN, "float8e5m2": ir.DataType.FLOAT8E5M2,
}
INTEGER_BITS: dict[ir.DataType, tuple[int, bool]] = {IR_TYPES[name]: (bits, signed) for name, (_, _, bits, signed) in INTEGER_DTYPES.items()}
#: 8-bit floating-point types (ONNX opset 19): name -> largest finite value. Quantized with a
#: symmetric scale (max |x| maps to that value) and zero point 0; no narrower widths.
FLOAT8_DTYPES = {"float8e4m3fn": 448.0, "float8e5m2": 57344.0}
GRANULARITIES = ("per-tensor", "per-channel", "per-block")
#: The code ranges of a weight narrower than its dtype (`TensorRule.low_bit_range`).
LOW_BIT_RANGES = ("narrow", "full")
#: A weight "width" of 32 in ``[bits] allowed`` means: leave this layer float.
FLOAT_WIDTH = 32


@dataclass(frozen=True)
class TensorRule:
    """How one class of tensors (activations or weights) is quantized."""

    dtype: str
    symmetric: bool
    granularity: str
    narrow_range: bool = False
    #: Weights narrower than ``dtype`` (a width from assign-precision, learn-bits or slb, stored
    #: in ``dtype``): ``"narrow"`` codes [-(2^(b-1) - 1), 2^(b-1) - 1], 2^b - 1 levels (2 bits is
    #: ternary), or ``"full"`` [-2^(b-1), 2^(b-1) - 1], all 2^b codes. The kernels see int8 either
    #: way; only the quantizer differs. None: as ``narrow_range``.
    low_bit_range: str | None = None
    #: Other integer types the backend also runs for these tensors (``qc validate`` accepts them;
    #: compiling emits ``dtype``).
    also_accepted: tuple[str, ...] = ()
    #: Weights, ``per-block``: consecutive weights along the reduction axis (a Conv's input
    #: channels, a MatMul's rows) that share one scale (DequantizeLinear's ``block_size``).
    block_size: int = 0
    #: Activations: false keeps them float (weight-only quantization).
    quantize: bool = True
    #: Weights: the largest |w0| + |w1| of two same-sign integer weights in one channel, where
    #: the CPU's kernels add pairs of products in int16 (set from ``[cpu] accumulation``, never
    #: written in a file); None where products accumulate exactly.
    pair_sum_limit: int | None = None

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every integer type the backend accepts for these tensors, ``dtype`` first."""
        return (self.dtype, *(d for d in self.also_accepted if d != self.dtype))

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer range used: the dtype's range, minus its lowest value when narrow. For a
        float8 type, (-max, max): the symmetric scale is then max |x| / max, as for integers."""
        if self.dtype in FLOAT8_DTYPES:
            top = int(FLOAT8_DTYPES[self.dtype])
            return -top, top
        qmin, qmax, _, _ = INTEGER_DTYPES[self.dtype]
        return (qmin + 1 if self.narrow_range and INTEGER_DTYPES[self.dtype][3] else qmin), qmax

    @property
    def levels(self) -> int:
        lo, hi = self.qrange
        return hi - lo + 1

    @property
    def bits(self) -> int:
        return 8 if self.dtype in FLOAT8_DTYPES else INTEGER_DTYPES[self.dtype][2]

    @property
    def is_float8(self) -> bool:
        return self.dtype in FLOAT8_DTYPES


#: Ops whose weights ``[ops] weight_only`` may store quantized in front of a float kernel.
WEIGHT_ONLY_OPS = ("LSTM", "GRU", "RNN")

#: How a quantized embedding table is read (``[embeddings] lowering``).
EMBEDDING_LOWERINGS = ("gather-cast-mul", "gather-block-quantized")


@dataclass(frozen=True)
class EmbeddingRule:
    """``[embeddings]``: constant Gather tables (token embeddings) stored as integers, weight-only.

    An embedding is read a few rows at a time, so it is gathered *as integers* and only those rows
    are dequantized: ``gather-cast-mul`` (standard ops, any opset: Gather on the integer table,
    Cast, Mul by each row's scale gathered beside it; per-row or per-tensor scales, 8-bit types,
    since ONNX's Gather takes no 4-bit ones) or ``gather-block-quantized`` (onnxruntime's
    com.microsoft GatherBlockQuantized kernel: 4-bit blocks along the row).
    """

    rule: TensorRule
    lowering: str
    #: Smaller tables stay float (position tables, small lookups): their bytes do not matter and
    #: every row of them is read at every run.
    min_elements: int = 4096


@dataclass(frozen=True)
class BiasRule:
    """Bias of Conv/Gemm: quantized to ``dtype`` with scale = input scale x weight scale."""

    quantize: bool = True
    dtype: str = "int32"


@dataclass(frozen=True)
class OpRules:
    """Which ops run quantized and how scales flow through the graph."""

    quantized: tuple[str, ...]
    passthrough: tuple[str, ...] = ()
    fused_activations: tuple[str, ...] = ()
    shared_scale: tuple[str, ...] = ()
    quantize_graph_outputs: bool = False
    #: Passthrough ops the backend runs on the integer tensor itself: DQ -> op -> Q becomes op.
    integer_passthrough: tuple[str, ...] = ()
    #: Where quantizers go: after every quantized op's output ("outputs", the onnxruntime QDQ
    #: convention), or only on the tensors a quantized op reads ("inputs", TensorRT's).
    placement: str = "outputs"
    #: What happens to a fused activation after a quantized op: "remove" it (the quantizer's clip
    #: does its job) or "keep" it, with the quantizer after it (the backend fuses op + activation).
    activation_fusion: str = "remove"
    #: Whether the backend runs an op it cannot quantize in float between a DequantizeLinear and a
    #: QuantizeLinear (onnxruntime, TensorRT), or rejects the graph (fully integer accelerators).
    float_fallback: bool = True
    #: (op type, why) for ops the target leaves float on purpose (``[ops.kept_float]``): activations
    #: measured no faster or no more accurate quantized on this backend. The reason is the report's
    #: note for each such node, so a user sees the measurement rather than "not quantized". An op
    #: also in ``quantized`` is quantized: TOML cannot delete an inherited key, so a file extending
    #: this one quantizes such an op by listing it there.
    kept_float: tuple[tuple[str, str], ...] = ()
    #: Ops that run in float but whose weights are stored quantized (the ``[weights]`` rule at the
    #: default width) and dequantized in front of them: recurrent layers, which no integer kernel
    #: here runs (quantize-recurrent-weights; LSTM, GRU and RNN).
    weight_only: tuple[str, ...] = ()

    def float_reason(self, op_type: str) -> str | None:
        """Why the target keeps ``op_type`` float, when its file says so."""
        return dict(self.kept_float).get(op_type)


@dataclass(frozen=True)
class BitRules:
    """Bit-widths mixed precision may choose, and those the backend runs natively.

    A weight width that is not native is stored in the next wider native ONNX integer type with
    its values limited to the narrower range, so the backend computes exactly what the quantizer
    meant (a QuantizeLinear -> Clip folded into the constant). An activation narrower than the
    activation dtype runs as QuantizeLinear -> Clip(b-bit range) -> DequantizeLinear.
    """

    allowed: tuple[int, ...] = (8,)
    native: tuple[int, ...] = (8,)
    #: Activation widths a pipeline may ask for (assign-precision{activation-bits=N}).
    activations: tuple[int, ...] = (8,)
    #: The width a weight gets when no pass chose one (assign-precision); the weight dtype's if unset.
    default: int | None = None


@dataclass(frozen=True)
class CostModel:
    """Relative latency per multiply-accumulate by dtype, with where the figures come from."""

    source: str
    mac: dict[str, float] = field(default_factory=dict)
    #: op type -> dtype -> cost per MAC, where an op's kernels differ from the ``mac`` figure
    #: (onnxruntime's CPU int4 Conv runs slower than its float Conv; its int4 MatMul faster).
    op: dict[str, dict[str, float]] = field(default_factory=dict)

    def per_mac(self, op_type: str, dtype: str) -> float | None:
        """Cost per multiply-accumulate of ``op_type`` computing with ``dtype`` weights."""
        return self.op.get(op_type, {}).get(dtype, self.mac.get(dtype))


@dataclass(frozen=True)
class SpeedRules:
    """``[speed]``: whether each weight layer is timed on the compiling CPU, quantized and in float
    with its DequantizeLinear/QuantizeLinear boundary, and left float where quantized is slower.

    A layer is left float only when its quantized form is slower by more than ``min_slowdown``
    (a ratio) and by more than ``min_difference_ms``: the margins keep timing noise from deciding.
    """

    keep_slower_float: bool = False
    min_slowdown: float = 1.15
    min_difference_ms: float = 0.005


#: How a backend's integer kernels sum uint8 x int8 products on one instruction set: exactly in
#: int32, or pairs of products first in int16 with saturation (VPMADDUBSW).
ACCUMULATIONS = ("int32", "int16-pairs")


@dataclass(frozen=True)
class MachineChoice:
    """The CPU a target was resolved for, and what its kernels made the compiler do."""

    cpu: str
    isa: str
    accumulation: str
    #: ``[cpu] accumulation`` as the file gives it: ISA -> accumulation.
    table: dict[str, str]
    reason: str
    #: ``[cpu] depthwise_exact``: depthwise convolutions run in a kernel of their own that
    #: accumulates exactly, so their weights keep the full range whatever the accumulation.
    depthwise_exact: bool = False


@dataclass(frozen=True)
class TargetSpec:
    """A backend as data: what it runs quantized, with which dtypes and rules, and what it costs."""

    name: str
    description: str
    min_opset: int
    pipeline: str
    activations: TensorRule
    weights: TensorRule
    bias: BiasRule
    ops: OpRules
    cost: CostModel
    bits: BitRules = BitRules()
    #: Files written beside model.onnx (``qcompiler.artifacts.EMITTERS``), e.g. "qnn-encodings".
    emit: tuple[str, ...] = ()
    #: onnxruntime optimization level the verifier runs both models at: "all" (as deployed) or
    #: "basic", for models whose numerics onnxruntime's extended fusions change.
    verify_optimization: str = "all"
    path: str = ""
    #: The pipeline ``qc compile --budget`` runs: per-layer weight widths by hessian-trace and
    #: assign-precision, whose ``budget`` option the budget fills in. Empty: no mixed precision.
    mixed_pipeline: str = ""
    #: Set for targets whose kernels depend on the CPU (a ``[cpu]`` section): which CPU, and why
    #: the weights are what they are there.
    machine: MachineChoice | None = None
    #: ``[speed]``: per-layer speed check (off unless the target file turns it on).
    speed: SpeedRules = SpeedRules()
    #: ``[energy] table``: the energy-per-operation table `qc cost` uses, a built-in name
    #: (``targets/energy/NAME.toml``) or a .toml path relative to the target file.
    energy_table: str = "horowitz-45nm"
    #: ``[embeddings]``: how constant Gather tables are stored (None: they stay float).
    embeddings: EmbeddingRule | None = None

    def quantizes(self, op_type: str) -> bool:
        return op_type in self.ops.quantized


# The schema: section -> key -> (type, required). Top-level keys live under "".
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "": {"name": (str, True), "description": (str, False), "extends": (str, False), "min_opset": (int, True), "pipeline": (str, True), "mixed_pipeline": (str, False), "emit": (list, False)},
    "activations": {"quantize": (bool, False), "dtype": (str, True), "symmetric": (bool, True), "granularity": (str, True), "narrow_range": (bool, False), "also_accepted": (list, False)},
    "weights": {"dtype": (str, True), "symmetric": (bool, True), "granularity": (str, True), "narrow_range": (bool, False), "low_bit_range": (str, False), "also_accepted": (list, False), "block_size": (int, False)},
    "bias": {"quantize": (bool, False), "dtype": (str, False)},
    "embeddings": {"dtype": (str, True), "symmetric": (bool, True), "granularity": (str, True), "narrow_range": (bool, False), "block_size": (int, False),
                   "lowering": (str, True), "min_elements": (int, False)},
    "ops": {
        "quantized": (list, True),
        "passthrough": (list, False),
        "fused_activations": (list, False),
        "shared_scale": (list, False),
        "quantize_graph_outputs": (bool, False),
        "integer_passthrough": (list, False),
        "placement": (str, False),
        "activation_fusion": (str, False),
        "float_fallback": (bool, False),
        "kept_float": (dict, False),
        "weight_only": (list, False),
    },
    "cost": {"source": (str, True), "mac": (dict, False), "op": (dict, False)},
    "bits": {"allowed": (list, False), "native": (list, False), "activations": (list, False), "default": (int, False)},
    "verify": {"optimization": (str, False)},
    "cpu": {"accumulation": (dict, True), "depthwise_exact": (bool, False)},
    "speed": {"keep_slower_float": (bool, False), "min_slowdown": ((int, float), False), "min_difference_ms": ((int, float), False)},
    "energy": {"table": (str, False)},
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise QCError(f"not valid TOML: {exc}", file=str(path)) from None
    except UnicodeDecodeError:
        raise QCError("not valid TOML (not UTF-8 text)", file=str(path)) from None
    except OSError as exc:
        raise QCError(f"cannot read target file: {exc.strerror}", file=str(path)) from None


def _resolve(name_or_path: str, relative_to: Path | None = None, where: str | None = None) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists() or "/" in name_or_path:
        if relative_to is not None and not candidate.is_absolute():
            candidate = relative_to / candidate
        if not candidate.is_file():
            raise QCError("no such target file", file=str(candidate))
        return candidate
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if not builtin.is_file():
        message = f"unknown target '{name_or_path}' (built-in targets: {', '.join(list_targets())}; or give a path to a .toml file)"
        raise QCError(message, file=where) if where else QCError(message, option="--target")
    return builtin


def _raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in chain:
        raise QCError("'extends' forms a cycle", file=f"{path}:extends")
    data = _read_toml(path)
    _check_keys(data, path)
    parent = data.get("extends")
    if parent is not None:
        base = _raw(_resolve(parent, path.parent, where=f"{path}:extends"), (*chain, path.resolve()))
        data = _merge(base, {k: v for k, v in data.items() if k != "extends"})
    return data


def _check_keys(data: dict[str, Any], path: Path) -> None:
    for key, value in data.items():
        if key in _SCHEMA and key != "" and not isinstance(value, dict):
            raise QCError(f"expected a table [{key}], got {type(value).__name__} {value!r}", file=f"{path}:{key}")
        if isinstance(value, dict) and key in _SCHEMA and key != "":
            for sub, subvalue in value.items():
                if sub not in _SCHEMA[key]:
                    raise QCError(f"unknown key (accepted: {', '.join(_SCHEMA[key])})", file=f"{path}:{key}.{sub}")
                _check_type(subvalue, _SCHEMA[key][sub][0], f"{path}:{key}.{sub}")
        elif key in _SCHEMA[""]:
            _check_type(value, _SCHEMA[""][key][0], f"{path}:{key}")
        else:
            accepted = [*_SCHEMA[""], *(s for s in _SCHEMA if s)]
            raise QCError(f"unknown key (accepted: {', '.join(accepted)})", file=f"{path}:{key}")


def _check_type(value: Any, expected: type | tuple[type, ...], where: str) -> None:
    # bool is an int in Python; a target file saying min_opset = true is still wrong.
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        name = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
        raise QCError(f"expected {name}, got {type(value).__name__} {value!r}", file=where)


def _require(data: dict[str, Any], section: str, key: str, path: Path) -> Any:
    table = data if section == "" else data.get(section, {})
    if key not in table:
        where = f"{section}.{key}" if section else key
        raise QCError("missing required key", file=f"{path}:{where}")
    return table[key]


def _tensor_rule(data: dict[str, Any], section: str, path: Path) -> TensorRule:
    if section == "activations" and data.get(section, {}).get("quantize", True) is False:
        # Weight-only: the activation keys do not apply and need not be written.
        return TensorRule(dtype="uint8", symmetric=False, granularity="per-tensor", quantize=False)
    dtype = _require(data, section, "dtype", path)
    names = [*(d for d in INTEGER_DTYPES if d != "int32"), *FLOAT8_DTYPES]
    if dtype not in names:
        raise QCError(f"'{dtype}' is not a supported dtype (accepted: {', '.join(names)})", file=f"{path}:{section}.dtype")
    if dtype in FLOAT8_DTYPES and (data[section].get("symmetric") is not True or data[section].get("narrow_range", False)):
        raise QCError(f"{dtype} is quantized symmetric (zero point 0) without narrow range: set symmetric = true", file=f"{path}:{section}.symmetric")
    granularity = _require(data, section, "granularity", path)
    if granularity not in GRANULARITIES:
        raise QCError(f"'{granularity}' is not one of: {', '.join(GRANULARITIES)}", file=f"{path}:{section}.granularity")
    also = data[section].get("also_accepted", [])
    if stray := [d for d in also if d not in names]:
        raise QCError(f"'{stray[0]}' is not a supported dtype (accepted: {', '.join(names)})", file=f"{path}:{section}.also_accepted")
    block = data[section].get("block_size", 0)
    blockable = section in ("weights", "embeddings")
    if granularity == "per-block" and (not blockable or block < 2):
        where = "block_size" if blockable else "granularity"
        raise QCError(f"per-block quantization needs {section} with block_size >= 2" if blockable else "only weights and embeddings can be quantized per-block", file=f"{path}:{section}.{where}")
    if block and granularity != "per-block":
        raise QCError(f"block_size applies to granularity = \"per-block\" (this section is {granularity})", file=f"{path}:{section}.block_size")
    low_bit_range = data[section].get("low_bit_range")
    if low_bit_range is not None and low_bit_range not in LOW_BIT_RANGES:
        raise QCError(f"'{low_bit_range}' is not one of: {', '.join(LOW_BIT_RANGES)}", file=f"{path}:{section}.low_bit_range")
    if low_bit_range is not None and not (data[section].get("symmetric") and INTEGER_DTYPES.get(dtype, (0, 0, 0, False))[3]):
        raise QCError("low_bit_range applies to symmetric signed integer weights", file=f"{path}:{section}.low_bit_range")
    return TensorRule(
        dtype=dtype,
        symmetric=_require(data, section, "symmetric", path),
        granularity=granularity,
        narrow_range=data[section].get("narrow_range", False),
        low_bit_range=low_bit_range,
        also_accepted=tuple(also),
        block_size=block,
    )


def _str_list(data: dict[str, Any], key: str, path: Path, required: bool = False) -> tuple[str, ...]:
    value = data.get("ops", {}).get(key)
    if value is None:
        if required:
            raise QCError("missing required key", file=f"{path}:ops.{key}")
        return ()
    if not all(isinstance(v, str) and v for v in value):
        raise QCError("expected a list of op type names", file=f"{path}:ops.{key}")
    return tuple(value)


def _kept_float(data: dict[str, Any], path: Path) -> tuple[tuple[str, str], ...]:
    table = data.get("ops", {}).get("kept_float", {})
    for op, reason in table.items():
        if not isinstance(reason, str) or not reason.strip():
            raise QCError(f"expected the reason {op} stays float, as a non-empty string; got {reason!r}", file=f"{path}:ops.kept_float.{op}")
    return tuple((op, " ".join(reason.split())) for op, reason in table.items())


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise QCError(f"'{value}' is not one of: {', '.join(choices)}", file=where)
    return value


def load_target(name_or_path: str, cpu: str | None = None) -> TargetSpec:
    """Load a built-in target by name (``ort-cpu``) or a user's target file by path.

    A target with a ``[cpu]`` section is resolved for the CPU this process runs on, or for the
    ISA ``cpu`` names (``avx2``, ``avx512-vnni``, ... : compiling for another machine).
    """
    path = _resolve(name_or_path)
    data = _raw(path)
    weight_only = data.get("activations", {}).get("quantize", True) is False
    for section, keys in _SCHEMA.items():
        if section in ("cpu", "embeddings") and section not in data:
            continue  # an optional section; its keys are required once it is there
        for key, (_, required) in keys.items():
            if required and key != "extends" and not (section == "activations" and weight_only):
                _require(data, section, key, path)
    min_opset = data["min_opset"]
    if not 7 <= min_opset <= 30:
        raise QCError(f"{min_opset} is not a plausible opset (7..30)", file=f"{path}:min_opset")
    activations = _tensor_rule(data, "activations", path)
    weights = _tensor_rule(data, "weights", path)
    if activations.granularity != "per-tensor":
        raise QCError("activations can only be quantized per-tensor", file=f"{path}:activations.granularity")
    bias_data = data.get("bias", {})
    bias = BiasRule(quantize=bias_data.get("quantize", True), dtype=bias_data.get("dtype", "int32"))
    if bias.dtype != "int32":
        raise QCError(f"'{bias.dtype}' is not supported for bias (accepted: int32)", file=f"{path}:bias.dtype")
    ops = OpRules(
        quantized=_str_list(data, "quantized", path, required=True),
        passthrough=_str_list(data, "passthrough", path),
        fused_activations=_str_list(data, "fused_activations", path),
        shared_scale=_str_list(data, "shared_scale", path),
        quantize_graph_outputs=data["ops"].get("quantize_graph_outputs", False),
        integer_passthrough=_str_list(data, "integer_passthrough", path),
        placement=_choice(data["ops"], "placement", ("outputs", "inputs"), f"{path}:ops.placement"),
        activation_fusion=_choice(data["ops"], "activation_fusion", ("remove", "keep"), f"{path}:ops.activation_fusion"),
        float_fallback=data["ops"].get("float_fallback", True),
        kept_float=_kept_float(data, path),
        weight_only=_str_list(data, "weight_only", path),
    )
    if stray := [op for op in ops.weight_only if op not in WEIGHT_ONLY_OPS]:
        raise QCError(f"'{stray[0]}' cannot be weight-only here (supported: {', '.join(WEIGHT_ONLY_OPS)})", file=f"{path}:ops.weight_only")
    if stray := [op for op in ops.integer_passthrough if op not in ops.passthrough]:
        raise QCError(f"'{stray[0]}' is not in ops.passthrough", file=f"{path}:ops.integer_passthrough")
    mac = data.get("cost", {}).get("mac", {})
    for dtype, value in mac.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise QCError(f"expected a positive number, got {value!r}", file=f"{path}:cost.mac.{dtype}")
    op_costs = data.get("cost", {}).get("op", {})
    for op_type, table in op_costs.items():
        if not isinstance(table, dict):
            raise QCError(f"expected a table of dtype = cost per MAC, got {table!r}", file=f"{path}:cost.op.{op_type}")
        for dtype, value in table.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise QCError(f"expected a positive number, got {value!r}", file=f"{path}:cost.op.{op_type}.{dtype}")
    if (activations.is_float8 or weights.is_float8) and min_opset < 19:
        raise QCError("float8 QuantizeLinear/DequantizeLinear need opset 19: set min_opset = 19", file=f"{path}:min_opset")
    if weights.granularity == "per-block" and min_opset < 21:
        raise QCError("per-block weights need DequantizeLinear's block_size, opset 21: set min_opset = 21", file=f"{path}:min_opset")
    bits_data = data.get("bits", {})
    widths = {}
    for key, rule in (("allowed", weights), ("native", weights), ("activations", activations)):
        values = bits_data.get(key, [rule.bits])
        # 1 bit is bipolar (sign x scale, QONNX BipolarQuant): weights only, and only where the
        # weight rule is symmetric and signed, whose integers -1 and +1 it stores.
        least = 1 if key == "allowed" else 2
        if not isinstance(values, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= least for b in values):
            bipolar = " (1 bit, bipolar, is for weights only: [bits] allowed)" if key == "activations" and isinstance(values, list) and 1 in values else ""
            weights_too = " (or 1: bipolar weights)" if key == "allowed" else ""
            raise QCError(f"expected integer bit-widths >= 2{weights_too}, got {values}{bipolar}", file=f"{path}:bits.{key}")
        if key == "allowed" and 1 in values and not rule.is_float8 and not (rule.symmetric and INTEGER_DTYPES[rule.dtype][3]):
            raise QCError(
                f"1-bit (bipolar) weights need a symmetric signed weight rule ([weights] here: {rule.dtype}, symmetric = {str(rule.symmetric).lower()}): drop 1 or change [weights]",
                file=f"{path}:bits.{key}",
            )
        # Widths above the dtype's cannot be stored (e.g. inherited by a target that narrows
        # weights to int4): they do not apply, and the dtype's own width always does.
        # 32 among the allowed weight widths lets assign-precision leave a layer float. A float8
        # type has no narrower widths (a target extending an integer one inherits its list, 1
        # included).
        keep_float = key == "allowed" and FLOAT_WIDTH in values
        narrower = set() if rule.is_float8 else {b for b in values if b <= rule.bits}
        widths[key] = tuple(sorted(narrower | {rule.bits} | ({FLOAT_WIDTH} if keep_float else set())))
    allowed, native = widths["allowed"], widths["native"]
    default = bits_data.get("default")
    if default is not None and default not in allowed:
        raise QCError(f"{default} is not one of the allowed widths {list(allowed)}", file=f"{path}:bits.default")
    if odd := [b for b in native if b not in (4, 8, 16)]:
        raise QCError(f"native widths must be ONNX integer types (4, 8, 16 bits), got {odd[0]}", file=f"{path}:bits.native")
    # The pipeline is parsed here so a bad default pipeline is reported against the target file.
    from qcompiler.pipeline import split_pipeline

    try:
        split_pipeline(data["pipeline"])
    except QCError as exc:
        raise QCError(exc.message, file=f"{path}:pipeline") from None
    mixed_pipeline = data.get("mixed_pipeline", "")
    if mixed_pipeline:
        _check_mixed_pipeline(mixed_pipeline, f"{path}:mixed_pipeline")
    if len(allowed) < 2:
        # One weight width leaves nothing to mix: an inherited mixed_pipeline does not apply (a
        # float8 target extending an integer one).
        mixed_pipeline = ""
    from qcompiler.artifacts import EMITTERS

    emit = data.get("emit", [])
    if stray := [e for e in emit if e not in EMITTERS]:
        raise QCError(f"unknown artifact {stray[0]!r} (known: {', '.join(EMITTERS)})", file=f"{path}:emit")
    if "qnn-encodings" in emit and 1 in allowed:
        # AIMET's encodings hold an affine range: two levels offset x s, (offset + 1) x s cannot say +-s.
        raise QCError("1-bit (bipolar) weights cannot be written as QNN encodings: drop 1", file=f"{path}:bits.allowed")
    machine = None
    if "cpu" in data:
        machine = dataclasses.replace(_machine_choice(data["cpu"]["accumulation"], cpu, f"{path}:cpu.accumulation"), depthwise_exact=data["cpu"].get("depthwise_exact", False))
        if machine.accumulation == "int16-pairs":
            from qcompiler.quant.pair_limit import pair_sum_limit

            lo, hi = weights.qrange
            if activations.bits == 8 and not weights.is_float8 and 2 * max(-lo, hi) <= pair_sum_limit():
                # Weights this narrow (int4) cannot overflow the pair sums: nothing to narrow, on
                # any CPU (refusing them made the same file load on VNNI machines only).
                machine = dataclasses.replace(machine, reason=f"{machine.isa}: the integer kernels add pairs of uint8 x int8 products in int16 with saturation (VPMADDUBSW), "
                                                              f"which {weights.dtype} weights cannot overflow (two sum to at most {2 * max(-lo, hi)} <= {pair_sum_limit()}): they keep their full range")
            elif not (weights.symmetric and weights.dtype == "int8" and activations.bits == 8):
                raise QCError("int16-pairs accumulation needs symmetric int8 weights and 8-bit activations", file=f"{path}:cpu.accumulation")
            else:
                weights = dataclasses.replace(weights, pair_sum_limit=pair_sum_limit())
    speed = _speed_rules(data.get("speed", {}), path)
    embeddings = _embedding_rule(data, min_opset, path) if "embeddings" in data else None
    return TargetSpec(
        name=data["name"],
        description=data.get("description", ""),
        min_opset=min_opset,
        pipeline=data["pipeline"],
        mixed_pipeline=mixed_pipeline,
        activations=activations,
        weights=weights,
        bias=bias,
        ops=ops,
        cost=CostModel(source=data["cost"]["source"], mac={k: float(v) for k, v in mac.items()}, op={o: {k: float(v) for k, v in t.items()} for o, t in op_costs.items()}),
        bits=BitRules(allowed=allowed, native=native, activations=widths["activations"], default=default),
        emit=tuple(emit),
        verify_optimization=_choice(data.get("verify", {}), "optimization", ("all", "basic"), f"{path}:verify.optimization"),
        path=str(path),
        machine=machine,
        speed=speed,
        energy_table=_energy_table(data.get("energy", {}), path),
        embeddings=embeddings,
    )


def _embedding_rule(data: dict[str, Any], min_opset: int, path: Path) -> EmbeddingRule:
    rule = _tensor_rule(data, "embeddings", path)
    table = data["embeddings"]
    lowering = _choice(table, "lowering", EMBEDDING_LOWERINGS, f"{path}:embeddings.lowering")
    where = f"{path}:embeddings"
    if rule.is_float8:
        raise QCError(f"embeddings are stored as integers; {rule.dtype} is not one", file=f"{where}.dtype")
    if lowering == "gather-cast-mul":
        if rule.dtype not in ("int8", "uint8"):
            raise QCError(f"gather-cast-mul gathers the integer table with ONNX Gather, which takes 8-bit types, not {rule.dtype}: use int8, or lowering = \"gather-block-quantized\"", file=f"{where}.dtype")
        if rule.granularity == "per-block":
            raise QCError("gather-cast-mul scales whole rows: granularity \"per-channel\" (a scale per row) or \"per-tensor\"", file=f"{where}.granularity")
    else:
        if rule.dtype not in ("int4", "uint4") or rule.granularity != "per-block":
            raise QCError("gather-block-quantized (onnxruntime's GatherBlockQuantized) reads int4 or uint4 blocks: dtype int4/uint4, granularity \"per-block\"", file=f"{where}.granularity")
        if rule.dtype == "int4" and not rule.symmetric:
            raise QCError("GatherBlockQuantized reads int4 blocks with zero point 0: symmetric = true (or dtype uint4 for zero points)", file=f"{where}.symmetric")
        if rule.block_size < 16 or rule.block_size & (rule.block_size - 1):
            raise QCError(f"GatherBlockQuantized needs a power-of-two block_size >= 16, got {rule.block_size}", file=f"{where}.block_size")
        if min_opset < 21:
            raise QCError("4-bit tables need opset 21 (int4/uint4 tensors): set min_opset = 21", file=f"{path}:min_opset")
    min_elements = table.get("min_elements", 4096)
    if min_elements < 0:
        raise QCError(f"expected a count >= 0, got {min_elements}", file=f"{where}.min_elements")
    return EmbeddingRule(rule=rule, lowering=lowering, min_elements=min_elements)


def _energy_table(table: dict[str, Any], path: Path) -> str:
    name = table.get("table", "horowitz-45nm")
    if name.endswith(".toml") and not Path(name).is_absolute():
        return str((Path(path).parent / name).resolve())
    return name


def _speed_rules(table: dict[str, Any], path: Path) -> SpeedRules:
    for key, least in (("min_slowdown", 1.0), ("min_difference_ms", 0.0)):
        value = table.get(key)
        if value is not None and (isinstance(value, bool) or value < least):
            raise QCError(f"expected a number >= {least:g}, got {value!r}", file=f"{path}:speed.{key}")
    default = SpeedRules()
    return SpeedRules(
        keep_slower_float=table.get("keep_slower_float", default.keep_slower_float),
        min_slowdown=float(table.get("min_slowdown", default.min_slowdown)),
        min_difference_ms=float(table.get("min_difference_ms", default.min_difference_ms)),
    )


def _check_mixed_pipeline(text: str, where: str) -> None:
    """A mixed-precision pipeline parses and has one assign-precision pass whose budget it leaves to ``--budget``."""
    from qcompiler.pipeline import split_pipeline

    try:
        steps = split_pipeline(text)
    except QCError as exc:
        raise QCError(exc.message, file=where) from None
    assigners = [s for s in steps if s.name == "assign-precision"]
    if len(assigners) != 1:
        raise QCError(f"expected one assign-precision pass (it takes --budget), found {len(assigners)}", file=where)
    if any(key == "budget" for key, _ in assigners[0].options):
        raise QCError("leave out assign-precision's budget: qc compile --budget sets it", file=where)


def _machine_choice(table: dict[str, Any], isa: str | None, where: str) -> MachineChoice:
    """Which accumulation the kernels use on the CPU compiled for, and the reason in words."""
    from qcompiler.cpu import ISAS, cpu_for_isa, detect_cpu

    for key, value in table.items():
        if key not in ISAS:
            raise QCError(f"unknown ISA {key!r} (known: {', '.join(ISAS)})", file=where)
        if value not in ACCUMULATIONS:
            raise QCError(f"expected one of {', '.join(ACCUMULATIONS)} for {key}, got {value!r}", file=where)
    info = cpu_for_isa(isa) if isa is not None else detect_cpu()
    # An ISA the file does not list gets the form that is exact on every kernel.
    accumulation = table.get(info.isa, "int16-pairs")
    listed = "" if info.isa in table else f" ({info.isa} is not listed in [cpu] accumulation: assumed the saturating kernels)"
    if accumulation == "int32":
        reason = f"{info.isa}: the integer kernels accumulate every product in int32, so weights use the full int8 range [-127, 127]"
    else:
        reason = (
            f"{info.isa}: the integer kernels add pairs of uint8 x int8 products in int16 with saturation (VPMADDUBSW), "
            "so each output channel's weights are scaled for any two of one sign to sum to at most 128 "
            f"(up to 127 levels a side where a channel allows, 64 at least, as onnxruntime's reduce_range){listed}"
        )
    return MachineChoice(cpu=info.summary(), isa=info.isa, accumulation=accumulation, table=dict(table), reason=reason)


def list_targets() -> list[str]:
    """Names of the built-in targets."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def target_to_toml(spec: TargetSpec) -> str:
    """The effective description of a target (after ``extends``) as TOML text."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value)  # JSON string escapes are valid TOML basic strings
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return repr(value)

    def key(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    lines = [
        f"name = {fmt(spec.name)}",
        f"description = {fmt(spec.description)}",
        f"min_opset = {spec.min_opset}",
        f"pipeline = {fmt(spec.pipeline)}",
        f"mixed_pipeline = {fmt(spec.mixed_pipeline)}",
        f"emit = {fmt(list(spec.emit))}",
        "",
    ]
    for section, rule in (("activations", spec.activations), ("weights", spec.weights)):
        if not rule.quantize:
            lines += [f"[{section}]", "quantize = false", ""]
            continue
        lines += [f"[{section}]", f"dtype = {fmt(rule.dtype)}", f"symmetric = {fmt(rule.symmetric)}", f"granularity = {fmt(rule.granularity)}", f"narrow_range = {fmt(rule.narrow_range)}", f"also_accepted = {fmt(list(rule.also_accepted))}"]
        lines += [f"low_bit_range = {fmt(rule.low_bit_range)}"] if rule.low_bit_range else []
        lines += [f"block_size = {rule.block_size}"] if rule.block_size else []
        lines += [""]
    lines += ["[bias]", f"quantize = {fmt(spec.bias.quantize)}", f"dtype = {fmt(spec.bias.dtype)}", ""]
    if spec.embeddings is not None:
        e = spec.embeddings
        lines += ["[embeddings]", f"dtype = {fmt(e.rule.dtype)}", f"symmetric = {fmt(e.rule.symmetric)}", f"granularity = {fmt(e.rule.granularity)}", f"narrow_range = {fmt(e.rule.narrow_range)}"]
        lines += [f"block_size = {e.rule.block_size}"] if e.rule.block_size else []
        lines += [f"lowering = {fmt(e.lowering)}", f"min_elements = {e.min_elements}", ""]
    lines += ["[ops]"] + [f"{k} = {fmt(getattr(spec.ops, k))}" for k in ("quantized", "passthrough", "fused_activations", "shared_scale", "quantize_graph_outputs", "integer_passthrough", "placement", "activation_fusion", "float_fallback", "weight_only")] + [""]
    if spec.ops.kept_float:
        lines += ["[ops.kept_float]"] + [f"{key(op)} = {fmt(reason)}" for op, reason in spec.ops.kept_float] + [""]
    lines += ["[bits]", f"allowed = {fmt(list(spec.bits.allowed))}", f"native = {fmt(list(spec.bits.native))}", f"activations = {fmt(list(spec.bits.activations))}"]
    lines += [f"default = {spec.bits.default}"] if spec.bits.default is not None else []
    lines += ["", "[verify]", f"optimization = {fmt(spec.verify_optimization)}"]
    if spec.machine is not None:
        lines += ["", f"# compiled for: {spec.machine.cpu}", f"# weights: {spec.machine.reason}", "[cpu]", "accumulation = { " + ", ".join(f"{key(k)} = {fmt(v)}" for k, v in spec.machine.table.items()) + " }", f"depthwise_exact = {fmt(spec.machine.depthwise_exact)}"]
    speed = spec.speed
    lines += ["", "[speed]", f"keep_slower_float = {fmt(speed.keep_slower_float)}", f"min_slowdown = {speed.min_slowdown}", f"min_difference_ms = {speed.min_difference_ms}"]
    lines += ["", "[cost]", f"source = {fmt(spec.cost.source)}", "", "[cost.mac]"] + [f"{key(k)} = {v}" for k, v in spec.cost.mac.items()]
    for op_type, table in spec.cost.op.items():
        lines += ["", f"[cost.op.{key(op_type)}]"] + [f"{key(k)} = {v}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
