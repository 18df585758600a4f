"""Number formats as values: integers, fixed point, minifloats and block-scaled formats.

Every quantized tensor in qcompiler is stored in one of these. A format knows its values and
rounds to them; the scales that map a tensor onto a format (per tensor, per channel) are the
quantizer's business, except for block formats, whose shared scale is part of the format.

- ``IntFormat``: ``int<b>`` / ``uint<b>`` (1-16 bits for tensors, 32 for int32 biases), two's
  complement codes; ``bipolar`` is the 1-bit {-1, +1} of QONNX's BipolarQuant.
- ``FixedFormat``: ``fixed<i,f>`` (``ufixed``): ``i`` integer bits (the sign included) and ``f``
  fraction bits, so the values are ``k / 2**f``: an integer format with a power-of-two scale.
- ``FloatFormat``: ``float<e,m>`` with a bias, subnormals or not, and one of four encodings of
  the special values: ``ieee`` (the top exponent is Inf/NaN: fp16, bf16, E5M2), ``fn`` (finite,
  only the all-ones code is NaN: E4M3FN, E8M0), ``fnuz`` (finite, NaN where -0 would be, bias one
  higher: E4M3FNUZ, E5M2FNUZ) and ``finite`` (no special value at all: the MX element types
  E2M1, E2M3, E3M2).
- ``BlockFormat``: elements of one format sharing a scale per block of ``block_size`` values:
  the OCP MX formats (MXFP8, MXFP6, MXFP4, MXINT8: block 32, E8M0 power-of-two scale) and NVFP4
  (E2M1 elements, block 16, E4M3 scale under a float32 per-tensor scale).

Rounding is to nearest with ties to even (what QuantizeLinear and ml_dtypes do), ties away from
zero, or stochastic. ``FloatFormat.round`` is bit-exact against ml_dtypes' casts where ml_dtypes
has the type (``saturate=False``), and against ONNX QuantizeLinear's ``saturate=1`` otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from qcompiler.errors import QCError

Rounding = Literal["nearest-even", "nearest-away", "stochastic"]
ROUNDINGS: tuple[str, ...] = ("nearest-even", "nearest-away", "stochastic")
Special = Literal["ieee", "fn", "fnuz", "finite"]


def _round_integers(y: np.ndarray, rounding: str, rng: np.random.Generator | None) -> np.ndarray:
    """``y`` (float64) rounded to integers: half to even, half away from zero, or stochastically
    (up with probability equal to the fraction, so the rounding is unbiased)."""
    if rounding == "nearest-even":
        return np.rint(y)
    if rounding == "nearest-away":
        return np.copysign(np.floor(np.abs(y) + 0.5), y)
    if rounding == "stochastic":
        rng = rng if rng is not None else np.random.default_rng(0)
        return np.floor(y + rng.random(np.shape(y)))
    raise QCError(f"unknown rounding '{rounding}': choose one of {', '.join(ROUNDINGS)}", option="rounding")


@dataclass(frozen=True)
class IntFormat:
    """``int<bits>`` or ``uint<bits>``: integer codes, two's complement when signed."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise QCError(f"integer formats have 1 to 32 bits, not {self.bits}: {format_help()}", option="format")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def min_value(self) -> float:
        return float(-(1 << (self.bits - 1))) if self.signed else 0.0

    @property
    def max_value(self) -> float:
        return float((1 << (self.bits - 1)) - 1) if self.signed else float((1 << self.bits) - 1)

    def round(self, x: np.ndarray, *, rounding: Rounding = "nearest-even", saturate: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """``x`` rounded to the nearest code, clipped to the range (integers always saturate)."""
        y = _round_integers(np.asarray(x, np.float64), rounding, rng)
        return np.clip(y, self.min_value, self.max_value).astype(np.float32)

    def representable(self, x: np.ndarray) -> np.ndarray:
        """Per element: is ``x`` exactly one of this format's values?"""
        x = np.asarray(x, np.float64)
        with np.errstate(invalid="ignore"):
            return np.isfinite(x) & (x == np.round(x)) & (x >= self.min_value) & (x <= self.max_value)

    def values(self) -> np.ndarray:
        """Every value, ascending."""
        return np.arange(self.min_value, self.max_value + 1, dtype=np.float32)


@dataclass(frozen=True)
class FixedFormat:
    """``fixed<i,f>``: ``i`` integer bits (the sign bit included when signed) and ``f`` fraction
    bits; the values are the integers of ``i + f`` bits divided by ``2**f``."""

    integer_bits: int
    fraction_bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if self.integer_bits < 0 or self.fraction_bits < 0 or not 1 <= self.integer_bits + self.fraction_bits <= 16 or (self.signed and self.integer_bits < 1):
            raise QCError(f"fixed<{self.integer_bits},{self.fraction_bits}> is not a format (1 to 16 bits in all, a signed one has its sign among the integer bits): {format_help()}", option="format")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}fixed<{self.integer_bits},{self.fraction_bits}>"

    @property
    def bits(self) -> int:
        return self.integer_bits + self.fraction_bits

    @property
    def codes(self) -> IntFormat:
        """The integer format of the stored codes (``value * 2**f``)."""
        return IntFormat(self.bits, self.signed)

    @property
    def step(self) -> float:
        return 2.0 ** -self.fraction_bits

    @property
    def min_value(self) -> float:
        return self.codes.min_value * self.step

    @property
    def max_value(self) -> float:
        return self.codes.max_value * self.step

    def round(self, x: np.ndarray, *, rounding: Rounding = "nearest-even", saturate: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """``x`` rounded to a multiple of ``2**-f`` within the range (fixed point always saturates)."""
        scaled = np.asarray(x, np.float64) * 2.0 ** self.fraction_bits
        return (self.codes.round(scaled, rounding=rounding, rng=rng).astype(np.float64) * self.step).astype(np.float32)

    def representable(self, x: np.ndarray) -> np.ndarray:
        return self.codes.representable(np.asarray(x, np.float64) * 2.0 ** self.fraction_bits)

    def values(self) -> np.ndarray:
        return (self.codes.values().astype(np.float64) * self.step).astype(np.float32)


@dataclass(frozen=True)
class FloatFormat:
    """``float<e,m>``: sign, ``e`` exponent bits with ``bias``, ``m`` mantissa bits.

    ``special`` says how the codes encode Inf and NaN (see the module docstring);
    ``subnormals=False`` flushes values below the smallest normal to zero; ``signed=False`` and
    ``has_zero=False`` describe E8M0, the MX scale type (2**-127 .. 2**127, no sign, no zero)."""

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    special: Special = "ieee"
    subnormals: bool = True
    signed: bool = True
    has_zero: bool = True

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        if not 1 <= e <= 8 or not 0 <= m <= 23 or e + m + int(self.signed) > 32:
            raise QCError(f"float<{e},{m}> is not a format (1 to 8 exponent bits, 0 to 23 mantissa bits): {format_help()}", option="format")
        if self.special not in ("ieee", "fn", "fnuz", "finite"):
            raise QCError(f"unknown special-value encoding '{self.special}': choose ieee, fn, fnuz or finite", option="format")
        if self.special == "ieee" and e < 2:
            raise QCError(f"float<{e},{m}> with Inf/NaN needs at least 2 exponent bits", option="format")
        if self.special == "fnuz" and not self.signed:
            raise QCError("fnuz encodes NaN in the sign bit: it needs a signed format", option="format")

    @property
    def effective_bias(self) -> int:
        if self.bias is not None:
            return self.bias
        return (1 << (self.exponent_bits - 1)) - (0 if self.special == "fnuz" else 1)

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def name(self) -> str:
        for alias, fmt in _NAMED_FLOATS.items():
            if fmt == self:
                return alias
        extras = []
        if self.bias is not None:
            extras.append(f"bias={self.bias}")
        if self.special != "ieee":
            extras.append(self.special)
        if not self.subnormals:
            extras.append("nosub")
        if not self.signed:
            extras.append("unsigned")
        if not self.has_zero:
            extras.append("nozero")
        return f"float<{self.exponent_bits},{self.mantissa_bits}{''.join(',' + x for x in extras)}>"

    @property
    def has_nan(self) -> bool:
        return self.special != "finite"

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def max_value(self) -> float:
        e, m, b = self.exponent_bits, self.mantissa_bits, self.effective_bias
        if self.special == "ieee":
            return math.ldexp(2.0 - 2.0**-m, (1 << e) - 2 - b)
        if self.special == "fn":
            # The all-ones code is NaN: the largest finite value is the code below it.
            return math.ldexp(2.0 - 2.0 ** (1 - m), (1 << e) - 1 - b) if m > 0 else math.ldexp(1.0, (1 << e) - 2 - b)
        return math.ldexp(2.0 - 2.0**-m, (1 << e) - 1 - b)

    @property
    def min_exponent(self) -> int:
        """The exponent of the smallest normal value. Without a zero (E8M0) the all-zeros exponent
        field is a normal value, 2**-bias, not the subnormal range."""
        return 1 - self.effective_bias if self.has_zero else -self.effective_bias

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.min_exponent)

    @property
    def min_value(self) -> float:
        """The smallest value (the most negative, or the smallest positive one without sign and zero)."""
        if not self.signed:
            return 0.0 if self.has_zero else self.min_normal
        return -self.max_value

    def round(self, x: np.ndarray, *, rounding: Rounding = "nearest-even", saturate: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """``x`` rounded to this format's values, as float32.

        ``saturate=True`` follows onnxruntime's QuantizeLinear with ``saturate=1``: a value past
        the largest, Inf included, goes to +-max (in fnuz formats too, where the ONNX spec's table
        says NaN: the runtime is what ships).
        ``saturate=False`` follows a plain cast (ml_dtypes): past the largest is Inf where the
        format has it, else NaN (``finite`` formats, which have neither, still saturate).
        NaN stays NaN (a format without NaN gets NaN too: nothing it could hold is right)."""
        with np.errstate(invalid="ignore"):  # signalling NaN payloads
            x = np.asarray(x, np.float64)
        a = np.abs(x)
        m = self.mantissa_bits
        safe = np.where(np.isfinite(a) & (a > 0), a, 1.0)
        _, exp2 = np.frexp(safe)
        # The binade of each value, with the subnormal range sharing the smallest normal's step.
        binade = np.maximum(exp2 - 1, self.min_exponent)
        step = np.ldexp(1.0, binade - m)
        r = _round_integers(a / step, rounding, rng) * step
        if not self.subnormals:
            low = a < self.min_normal
            r = np.where(low, np.where(_round_integers(a / self.min_normal, rounding, rng) >= 1, self.min_normal, 0.0), r)
        top = self.max_value
        over = r > top
        if saturate or self.special == "finite":
            overflow = top
        else:
            overflow = np.inf if self.has_inf else np.nan
        r = np.where(over, overflow, r)
        infinite = np.isinf(a)
        if saturate:
            r = np.where(infinite, top, r)
        else:
            r = np.where(infinite, np.inf if self.has_inf else (top if self.special == "finite" else np.nan), r)
        r = np.where(np.isnan(a), np.nan, r)
        if not self.has_zero:
            r = np.where((r < self.min_value) & ~np.isnan(r), self.min_value, r)
            r = np.where(x == 0, np.nan, r)
        if self.signed:
            # fnuz has no -0 (its code is NaN): a value rounding to zero is +0 there.
            r = np.copysign(r, x) if self.special != "fnuz" else np.where(r == 0, 0.0, np.copysign(r, x))
        else:
            r = np.where(x < 0, np.nan, r)
        return r.astype(np.float32)

    def representable(self, x: np.ndarray) -> np.ndarray:
        """Per element: is ``x`` one of this format's values (Inf and NaN only where it has them)?"""
        x = np.asarray(x, np.float32)
        with np.errstate(invalid="ignore"):
            same = self.round(x, saturate=False) == x
            if self.has_inf:
                same |= np.isinf(x)
            if self.has_nan:
                same |= np.isnan(x)
            if self.special == "fnuz":
                same &= ~((x == 0) & np.signbit(x))
        return same

    def values(self) -> np.ndarray:
        """Every finite value, ascending (formats of at most 16 bits)."""
        if self.bits > 16:
            raise QCError(f"{self.name} has too many values to list", option="format")
        m, bias = self.mantissa_bits, self.effective_bias
        fields = np.arange(1 << (self.exponent_bits + m), dtype=np.int64)
        exp_field, mant = fields >> m, fields & ((1 << m) - 1)
        normal = np.ldexp(1.0 + mant / float(1 << m), exp_field - bias)
        if self.has_zero:
            normal = np.where(exp_field == 0, np.ldexp(mant.astype(np.float64), 1 - bias - m) if self.subnormals else 0.0, normal)
        magnitude = normal[normal <= self.max_value]
        if not self.has_zero:
            magnitude = magnitude[magnitude > 0]
        out = np.unique(np.concatenate([-magnitude, magnitude]) if self.signed else magnitude).astype(np.float32)
        out[out == 0] = 0.0  # +0, the zero every format holds
        return out


@dataclass(frozen=True)
class BipolarFormat:
    """``bipolar``: the two values -1 and +1 (a weight's sign times its scale; QONNX's BipolarQuant)."""

    name: str = "bipolar"
    bits: int = 1
    min_value: float = -1.0
    max_value: float = 1.0

    def round(self, x: np.ndarray, *, rounding: Rounding = "nearest-even", saturate: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """+1 for x >= 0, else -1 (BipolarQuant's rule; the rounding mode has nothing to choose)."""
        return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)

    def representable(self, x: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(x, np.float64)) == 1

    def values(self) -> np.ndarray:
        return np.array([-1.0, 1.0], np.float32)


BIPOLAR = BipolarFormat()

ElementFormat = Union[IntFormat, FixedFormat, FloatFormat]


@dataclass(frozen=True)
class BlockFormat:
    """Elements of ``element`` sharing one scale per ``block_size`` consecutive values along an axis.

    ``scale`` is the scale's own format: E8M0 (a power of two, OCP MX) or E4M3FN (NVFP4, which
    also keeps one float32 scale per tensor so that the block scales fit E4M3's range)."""

    name: str
    element: ElementFormat
    block_size: int
    scale: FloatFormat
    tensor_scale: bool = False

    @property
    def bits(self) -> float:
        """Bits per element, the block's scale shared among its elements."""
        return self.element.bits + self.scale.bits / self.block_size

    @property
    def element_emax(self) -> int:
        """The exponent of the element format's largest power of two (the MX spec's ``emax_elem``)."""
        return math.floor(math.log2(self.element.max_value))

    def quantize(self, x: np.ndarray, axis: int = -1, *, rounding: Rounding = "nearest-even", rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(elements, block scales, tensor scale) of ``x`` in blocks along ``axis``: the elements
        as ``x``'s shape, the scales with ``axis`` counted in blocks (the last one zero-padded).
        ``x ~= elements * scales (repeated per block) * tensor scale``."""
        x = np.asarray(x, np.float32)
        if x.ndim == 0:
            x = x.reshape(1)
        axis = axis % x.ndim
        moved = np.moveaxis(x, axis, -1)
        length = moved.shape[-1]
        count = -(-length // self.block_size)
        padded = np.zeros((*moved.shape[:-1], count * self.block_size), np.float64)
        padded[..., :length] = moved
        blocks = padded.reshape(*moved.shape[:-1], count, self.block_size)
        amax = np.max(np.abs(blocks), axis=-1)
        tensor_scale = 1.0
        if self.tensor_scale:
            peak = float(np.max(amax)) if amax.size else 0.0
            tensor_scale = peak / (self.element.max_value * self.scale.max_value) if peak > 0 else 1.0
        if self.scale.mantissa_bits == 0:
            # OCP MX: the shared exponent is floor(log2(amax)) - emax_elem, clamped to E8M0's range.
            _, exp2 = np.frexp(np.where(amax > 0, amax, 1.0))
            shared = np.clip(np.where(amax > 0, exp2 - 1 - self.element_emax, -127), -127, 127)
            scales = np.ldexp(1.0, shared)
        else:
            scales = self.scale.round(amax / tensor_scale / self.element.max_value).astype(np.float64)
        divisor = scales[..., None] * tensor_scale
        with np.errstate(divide="ignore", invalid="ignore"):
            elements = np.where(divisor > 0, self.element.round(np.where(divisor > 0, blocks / np.where(divisor > 0, divisor, 1.0), 0.0), rounding=rounding, saturate=True, rng=rng), 0.0)
        elements = elements.reshape(*moved.shape[:-1], count * self.block_size)[..., :length]
        return np.moveaxis(elements.astype(np.float32), -1, axis), np.moveaxis(scales.astype(np.float32), -1, axis), float(tensor_scale)

    def dequantize(self, elements: np.ndarray, scales: np.ndarray, tensor_scale: float, axis: int = -1) -> np.ndarray:
        """The float32 values ``quantize``'s parts stand for."""
        elements = np.asarray(elements, np.float32)
        axis = axis % elements.ndim
        # Each block's scale as one float32 (the block scale times the tensor scale), then one
        # float32 product per element: what DequantizeLinear with block_size computes.
        scale32 = (np.asarray(scales, np.float32) * np.float32(tensor_scale)).astype(np.float32)
        repeated = np.take(np.repeat(scale32, self.block_size, axis=axis), np.arange(elements.shape[axis]), axis=axis)
        return (elements * repeated).astype(np.float32)

    def round(self, x: np.ndarray, axis: int = -1, *, rounding: Rounding = "nearest-even", rng: np.random.Generator | None = None) -> np.ndarray:
        """``x`` through this format and back: what a tensor stored in it holds."""
        shape = np.shape(x)
        out = self.dequantize(*self.quantize(x, axis, rounding=rounding, rng=rng), axis=axis)
        return out.reshape(shape)


NumberFormat = Union[IntFormat, FixedFormat, FloatFormat, BipolarFormat, BlockFormat]

E4M3FN = FloatFormat(4, 3, special="fn")
E5M2 = FloatFormat(5, 2)
E8M0 = FloatFormat(8, 0, bias=127, special="fn", subnormals=False, signed=False, has_zero=False)

#: Minifloats known by name (the ml_dtypes / ONNX names, and the usual short ones).
_NAMED_FLOATS: dict[str, FloatFormat] = {
    "fp32": FloatFormat(8, 23),
    "fp16": FloatFormat(5, 10),
    "bf16": FloatFormat(8, 7),
    "e4m3fn": E4M3FN,
    "e4m3fnuz": FloatFormat(4, 3, special="fnuz"),
    "e5m2": E5M2,
    "e5m2fnuz": FloatFormat(5, 2, special="fnuz"),
    "e4m3": FloatFormat(4, 3),
    "e3m4": FloatFormat(3, 4),
    "e2m1": FloatFormat(2, 1, special="finite"),
    "e2m3": FloatFormat(2, 3, special="finite"),
    "e3m2": FloatFormat(3, 2, special="finite"),
    "e8m0": E8M0,
}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "fp4": "e2m1", "fp8": "e4m3fn",
            "float8e4m3fn": "e4m3fn", "float8e4m3fnuz": "e4m3fnuz", "float8e5m2": "e5m2", "float8e5m2fnuz": "e5m2fnuz",
            "float8e8m0": "e8m0", "float4e2m1": "e2m1"}

#: The OCP MX formats (block 32, E8M0 scale) and NVFP4.
_NAMED_BLOCKS: dict[str, BlockFormat] = {
    "mxfp8": BlockFormat("mxfp8", E4M3FN, 32, E8M0),
    "mxfp8_e5m2": BlockFormat("mxfp8_e5m2", E5M2, 32, E8M0),
    "mxfp6": BlockFormat("mxfp6", _NAMED_FLOATS["e2m3"], 32, E8M0),
    "mxfp6_e3m2": BlockFormat("mxfp6_e3m2", _NAMED_FLOATS["e3m2"], 32, E8M0),
    "mxfp4": BlockFormat("mxfp4", _NAMED_FLOATS["e2m1"], 32, E8M0),
    # MXINT8 elements are 8-bit two's complement with an implied scale of 2**-6.
    "mxint8": BlockFormat("mxint8", FixedFormat(2, 6), 32, E8M0),
    "nvfp4": BlockFormat("nvfp4", _NAMED_FLOATS["e2m1"], 16, E4M3FN, tensor_scale=True),
}
_BLOCK_ALIASES = {"mxfp8_e4m3": "mxfp8", "mxfp6_e2m3": "mxfp6"}


def format_help() -> str:
    """One line listing the formats ``parse_format`` accepts."""
    return ("valid formats: int<b> / uint<b> (b = 1..16, e.g. int8; int32 for biases), bipolar, fixed<i,f> / ufixed<i,f>, "
            "float<e,m[,bias=B][,ieee|fn|fnuz|finite][,nosub]>, " + ", ".join(_NAMED_FLOATS) + ", " + ", ".join(_NAMED_BLOCKS))


def parse_format(text: str) -> NumberFormat:
    """The format a string names: ``int8``, ``uint4``, ``int<3>``, ``fixed<4,3>``, ``float<4,3>``,
    ``float<5,2,bias=15,nosub>``, ``e4m3fn``, ``fp16``, ``mxfp4``, ``nvfp4``... A QCError that lists
    the valid ones otherwise."""
    raw = text
    text = text.strip().lower().replace(" ", "")
    if text in _ALIASES:
        text = _ALIASES[text]
    if text in _NAMED_FLOATS:
        return _NAMED_FLOATS[text]
    if text == "bipolar":
        return BIPOLAR
    if text in _BLOCK_ALIASES:
        text = _BLOCK_ALIASES[text]
    if text in _NAMED_BLOCKS:
        return _NAMED_BLOCKS[text]
    try:
        match = re.fullmatch(r"(u?)int(?:<(-?\d+)>|(-?\d+))", text)
        if match:
            return IntFormat(int(match.group(2) or match.group(3)), signed=not match.group(1))
        match = re.fullmatch(r"(u?)fixed<(-?\d+),(-?\d+)>", text)
        if match:
            return FixedFormat(int(match.group(2)), int(match.group(3)), signed=not match.group(1))
        match = re.fullmatch(r"float<(-?\d+),(-?\d+)((?:,[a-z0-9=+-]+)*)>", text)
        if match:
            options: dict = {}
            for item in filter(None, match.group(3).split(",")):
                if item.startswith("bias="):
                    options["bias"] = int(item[5:])
                elif item in ("ieee", "fn", "fnuz", "finite"):
                    options["special"] = item
                elif item == "nosub":
                    options["subnormals"] = False
                elif item == "unsigned":
                    options["signed"] = False
                elif item == "nozero":
                    options["has_zero"] = False
                else:
                    raise QCError(f"unknown float format flag '{item}' in '{raw}': {format_help()}", option="format")
            return FloatFormat(int(match.group(1)), int(match.group(2)), **options)
    except ValueError:
        pass
    raise QCError(f"unknown number format '{raw}': {format_help()}", option="format")


def parse_format_list(text: str) -> list[NumberFormat]:
    """The formats a '|'-separated list names, each item a format or a grid of them: any number in
    an item may be a range ``a..b`` (``int<2..8>``, ``float<2..5,1..7>``, ``fixed<1..3,4..6>``),
    expanded over every combination. Duplicates are dropped, order kept; a QCError names the item
    at fault."""
    import itertools

    formats: list[NumberFormat] = []
    for item in filter(None, (part.strip() for part in text.split("|"))):
        pieces = re.split(r"(-?\d+\.\.-?\d+)", item)
        choices = []
        for piece in pieces:
            if re.fullmatch(r"-?\d+\.\.-?\d+", piece):
                lo, hi = (int(v) for v in piece.split(".."))
                if hi < lo or hi - lo > 64:
                    raise QCError(f"range '{piece}' in '{item}' must run upwards over at most 64 values", option="formats")
                choices.append([str(v) for v in range(lo, hi + 1)])
            else:
                choices.append([piece])
        formats.extend(parse_format("".join(combo)) for combo in itertools.product(*choices))
    if not formats:
        raise QCError(f"no format in '{text}': {format_help()}", option="formats")
    return list(dict.fromkeys(formats))


def one_bit_neighbours(fmt: NumberFormat, wider: bool) -> list[NumberFormat]:
    """The formats of ``fmt``'s family one bit wider (or narrower): int/uint with a bit more or
    less, fixed point with a fraction (or integer) bit more or less, a float with a mantissa (or
    exponent) bit more or less, its other flags kept. Hill et al.'s refinement steps between them;
    blocks and bipolar have none."""
    step = 1 if wider else -1
    found: list[NumberFormat] = []

    def attempt(make) -> None:
        try:
            found.append(make())
        except (QCError, ValueError):
            pass

    if isinstance(fmt, IntFormat) and fmt.bits + step >= 2:
        attempt(lambda: IntFormat(fmt.bits + step, fmt.signed))
    elif isinstance(fmt, FixedFormat):
        attempt(lambda: FixedFormat(fmt.integer_bits, fmt.fraction_bits + step, fmt.signed))
        attempt(lambda: FixedFormat(fmt.integer_bits + step, fmt.fraction_bits, fmt.signed))
    elif isinstance(fmt, FloatFormat):
        attempt(lambda: dataclasses.replace(fmt, mantissa_bits=fmt.mantissa_bits + step))
        attempt(lambda: dataclasses.replace(fmt, exponent_bits=fmt.exponent_bits + step))
    return [f for f in found if f.bits == fmt.bits + step]


def format_chain(fmt: NumberFormat) -> tuple:
    """The key of the chain of formats that differ from ``fmt`` only in one width (integer bits;
    fixed point's fraction bits; a float's mantissa bits): along a chain more bits never round
    worse, so a binary search over it finds the narrowest that meets a goal."""
    if isinstance(fmt, IntFormat):
        return ("int", fmt.signed)
    if isinstance(fmt, FixedFormat):
        return ("fixed", fmt.integer_bits, fmt.signed)
    if isinstance(fmt, FloatFormat):
        return ("float", fmt.exponent_bits, fmt.bias, fmt.special, fmt.subnormals, fmt.signed, fmt.has_zero)
    return ("single", fmt.name)
