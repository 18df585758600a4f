"""The weight quantizer every pass shares: integer grids per tensor, channel or block, bipolar
signs, float8, and where each layer's weight is quantized (its layout on a target).

insert-qdq stores what `quantize_weight` returns; adaround, the training passes and the
sensitivity estimates round onto the same `WeightGrid`, so what they measure is what ships.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.op_roles import input_roles
from qcompiler.quant.formats import parse_format
from qcompiler.quant.pair_limit import pair_safe_scale
from qcompiler.quant.uniform import _MIN_SCALE, affine_params, channel_ranges, dequantize, mse_channel_ranges, per_channel, quantize
from qcompiler.targets.spec import FLOAT8_DTYPES, INTEGER_DTYPES, IR_TYPES, TensorRule


#: The weight width that is bipolar: values -scale and +scale (integers -1 and +1, zero point 0),
#: QONNX's BipolarQuant. The spec allows it only for symmetric signed weight rules.
BIPOLAR_BITS = 1


def weight_qrange(rule: TensorRule, bits: int) -> tuple[int, int]:
    """The integer range of a ``bits``-wide weight under ``rule`` (narrow and symmetric as it says;
    below the dtype's width, narrow as ``rule.low_bit_range`` says where it is set);
    at 1 bit (bipolar) [-1, 1], of which only -1 and +1 occur."""
    if bits == BIPOLAR_BITS:
        return -1, 1
    if rule.symmetric or rule.narrow_range:
        top = 2 ** (bits - 1) - 1
        narrow = rule.narrow_range
        if rule.low_bit_range is not None and bits < rule.bits:
            narrow = rule.low_bit_range == "narrow"
        return (-top if narrow else -top - 1), top
    return 0, 2**bits - 1


#: How a weight channel's range is chosen: its min/max, the range minimising the squared error,
#: or ``auto``: min/max at 4 bits and more, MSE below (see `resolve_weight_range`).
WeightRange = Literal["auto", "minmax", "mse"]
#: At this many bits and fewer, ``auto`` clips: with min/max, a 2-bit (ternary) quantizer rounds
#: ~70 % of a layer's weight energy away on the CIFAR ResNets and 3 bits wastes levels on rare
#: outliers; at 4 bits and more the clipping cost more accuracy than it saved (ResNet-20).
AUTO_MSE_MAX_BITS = 3


def resolve_weight_range(weight_range: str, bits: int) -> str:
    """``minmax`` or ``mse`` for a ``bits``-wide weight."""
    if weight_range == "auto":
        return "mse" if bits <= AUTO_MSE_MAX_BITS else "minmax"
    return weight_range


@dataclass(frozen=True)
class WeightGrid:
    """The integer grid a uniform weight quantizer rounds onto: ``scale`` and ``zero_point`` per
    channel (along ``axis``; None: one for the tensor) and the codes allowed in each channel,
    ``lo`` to ``hi`` (broadcastable over the weight: a pair-limited channel stops below qmax).

    Rounding to nearest onto it is `quantize_weight`; AdaRound chooses, per weight, the code
    below or above on the same grid, so both ship the same scales.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    axis: int | None

    def expand(self, p: np.ndarray, ndim: int) -> np.ndarray:
        """A per-channel array shaped to broadcast over a weight of ``ndim`` dimensions."""
        return per_channel(np.asarray(p), ndim, self.axis)

    def nearest(self, w: np.ndarray) -> np.ndarray:
        """The codes of ``w`` rounded half to even, as QuantizeLinear does (int64)."""
        q = quantize(w, self.scale, self.zero_point, -(2**62), 2**62, axis=self.axis)
        return np.clip(q, self.expand(self.lo, w.ndim), self.expand(self.hi, w.ndim))

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """The float32 values the codes ``q`` stand for."""
        return dequantize(q, self.scale, self.zero_point, axis=self.axis)


@dataclass(frozen=True)
class RoundedWeight:
    """A weight's integer codes chosen on ``grid`` by a pass other than the plain rounding (each
    within one step of the float weight) at ``bits`` bits; the initializer holds their float values."""

    codes: np.ndarray
    grid: WeightGrid
    bits: int
    #: The float weight the codes stand for: bias correction measures the codes' error against it.
    float_weight: np.ndarray

    def matches(self, w: np.ndarray, axis: int | None, bits: int) -> bool:
        """Whether ``w`` is still exactly what these codes stand for, at the same axis and width
        (a later pass that moved the weight, or another width, makes them stale)."""
        return self.grid.axis == axis and self.bits == bits and w.shape == self.codes.shape and np.array_equal(self.grid.dequantize(self.codes), w)

    def channels_scaled(self, a: np.ndarray, axis: int) -> RoundedWeight | None:
        """The same codes standing for the weight with channel ``c`` along ``axis`` multiplied by
        ``a[c]`` (a BatchNormalization folded into the layer): the scales take ``|a|``, and a
        channel with ``a < 0`` its codes, zero point and code range negated. None where that is
        no grid of this kind: another channel axis, a zero factor, per-tensor codes with unequal factors."""
        a = np.asarray(a, np.float64).reshape(-1)
        codes = np.asarray(self.codes)
        if not np.all(np.isfinite(a)) or np.any(a == 0) or codes.ndim <= axis or a.size not in (1, codes.shape[axis]):
            return None
        if self.grid.axis is None:
            if not (np.all(a == a[0]) and a[0] > 0):
                return None
            grid = WeightGrid((np.asarray(self.grid.scale, np.float64) * a[0]).astype(np.float32), self.grid.zero_point, self.grid.lo, self.grid.hi, None)
            return RoundedWeight(codes, grid, self.bits, (self.float_weight * a[0]).astype(np.float32))
        if self.grid.axis != axis:
            return None
        a = np.broadcast_to(a, (codes.shape[axis],))
        flip = a < 0
        channel = (codes.shape[axis],)
        lo, hi, zp = (np.broadcast_to(np.asarray(p, np.int64).reshape(-1) if np.size(p) > 1 else np.asarray(p, np.int64), channel) for p in (self.grid.lo, self.grid.hi, self.grid.zero_point))
        grid = WeightGrid((np.broadcast_to(np.asarray(self.grid.scale, np.float64).reshape(-1), channel) * np.abs(a)).astype(np.float32).reshape(np.shape(self.grid.scale) if np.size(self.grid.scale) > 1 else channel),
                          np.where(flip, -zp, zp).astype(np.asarray(self.grid.zero_point).dtype), np.where(flip, -hi, lo), np.where(flip, -lo, hi), axis)
        sign = per_channel(np.where(flip, -1, 1), codes.ndim, axis)
        return RoundedWeight(codes * sign, grid, self.bits, (self.float_weight * per_channel(a, codes.ndim, axis)).astype(np.float32))


def weight_grid(w: np.ndarray, rule: TensorRule, bits: int, axis: int | None, weight_range: str = "auto") -> WeightGrid:
    """The uniform integer grid `quantize_weight` rounds ``w`` onto at ``bits`` bits (per channel
    along ``axis``): integer rules, per tensor or per channel, 2 bits and more (not float8, per-block
    or bipolar, which have no such grid: ValueError)."""
    if rule.is_float8 or rule.granularity == "per-block" or bits == BIPOLAR_BITS:
        raise ValueError(f"no uniform integer grid for {rule.dtype} {rule.granularity} weights at {bits} bit(s)")
    qmin, qmax = weight_qrange(rule, bits)
    if resolve_weight_range(weight_range, bits) == "mse":
        lo, hi = mse_channel_ranges(w, axis, qmin, qmax, rule.symmetric)
    else:
        lo, hi = channel_ranges(w, axis)
    scale, zp = affine_params(lo, hi, qmin, qmax, rule.symmetric)
    code_lo, code_hi = np.full(np.shape(scale), qmin, np.int64), np.full(np.shape(scale), qmax, np.int64)
    if rule.pair_sum_limit and rule.symmetric and qmax - qmin > rule.pair_sum_limit:
        # The kernels of this CPU add pairs of products in int16: narrow each channel just enough.
        bound = np.maximum(-np.minimum(lo, 0), np.maximum(hi, 0))
        scale, top = pair_safe_scale(w, axis, bound, qmax, rule.pair_sum_limit)
        code_lo, code_hi = np.maximum(code_lo, -top), np.minimum(code_hi, top)
    return WeightGrid(scale, zp, code_lo, code_hi, axis)


def quantize_weight(w: np.ndarray, rule: TensorRule, bits: int, axis: int | None, weight_range: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integer values, scale, zero point) of ``w`` at ``bits`` bits, per channel along ``axis``.

    The one weight quantizer: insert-qdq stores what it returns, and the sensitivities and the
    empirical check measure its error, so the estimates describe the model that ships.
    At 1 bit it is bipolar (`quantize_bipolar`); ``weight_range`` does not apply there.
    """
    if rule.is_float8:
        return quantize_float8(w, rule.dtype, channel_ranges(w, axis), axis)
    if rule.granularity == "per-block" and axis is not None:
        # Each block is a row of a [blocks, block_size] matrix: per-row ranges are per-block ones.
        rows, restore = _blocks(w, axis, rule.block_size)
        if bits == BIPOLAR_BITS:
            # The zero padding of the last block is no weight: mean |w| over the real ones only.
            real, _ = _blocks(np.ones(w.shape, np.float32), axis, rule.block_size)
            q, scale, zp = quantize_bipolar(rows, 0, real.sum(axis=1))
        else:
            q, scale, zp = quantize_weight(rows, dataclasses.replace(rule, granularity="per-channel"), bits, 0, weight_range)
        return restore(q), *(restore(p, blocked=True) for p in (scale, zp))
    if bits == BIPOLAR_BITS:
        return quantize_bipolar(w, axis)
    grid = weight_grid(w, rule, bits, axis, weight_range)
    return grid.nearest(w), grid.scale, grid.zero_point


@dataclass(frozen=True)
class WeightLayout:
    """How a layer's weight is quantized for a target: the rule (the target's, less its pair-sum
    limit where the CPU runs this layer exactly), the channel axis (None: per tensor) and the block
    size (0: not blocked)."""

    rule: TensorRule
    axis: int | None
    block: int


def is_depthwise(node: ir.Node, w: np.ndarray) -> bool:
    """A Conv with one input channel per group and as many groups as output channels."""
    group = node.attributes["group"].as_int() if "group" in node.attributes else 1
    return node.op_type == "Conv" and w.ndim >= 3 and w.shape[1] == 1 and group == w.shape[0] and group > 1


def weight_layout(node: ir.Node, w: np.ndarray, target, axis: int | None) -> WeightLayout:
    """The `WeightLayout` of weight ``w`` of ``node`` (output-channel axis ``axis``) on ``target``
    (a `TargetSpec`): what insert-qdq stores, and what AdaRound rounds onto."""
    rule: TensorRule = target.weights
    per_channel = rule.granularity == "per-channel" and axis is not None and w.ndim > 1
    if node.op_type == "ConvTranspose" and "group" in node.attributes and node.attributes["group"].as_int() != 1:
        per_channel = False  # output channels are split across groups: no single axis holds them
    ax = axis if per_channel else None
    block = 0
    if rule.granularity == "per-block" and axis is not None and w.ndim > 1:
        ax, block = block_axis(node, axis, w.ndim), rule.block_size
    if rule.pair_sum_limit and target.machine is not None and target.machine.depthwise_exact and is_depthwise(node, w):
        rule = dataclasses.replace(rule, pair_sum_limit=None)  # its kernel accumulates exactly
    return WeightLayout(rule, ax, block)


def quantize_bipolar(w: np.ndarray, axis: int | None, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integers in {-1, +1}, scale, zero point 0) of ``w`` quantized to its sign, per channel along
    ``axis`` (over the whole tensor when None): w >= 0 -> +1, else -1, as QONNX's BipolarQuant
    (where(x >= 0, 1, -1) x scale; docs/qonnx-custom-ops/bipolarquant_v1.md). The scale is each
    channel's mean |w|, which minimises ||w - scale x sign(w)||^2 (BinaryConnect, XNOR-Net), so
    `dequantize` gives scale x sign(w) exactly. ``counts``: the number of real weights per channel
    where some are padding zeros (per-block weights)."""
    w = np.asarray(w, np.float32)
    q = np.where(w >= 0, 1, -1).astype(np.int64)
    magnitude = np.abs(w).astype(np.float64)
    if axis is None:
        total, n = magnitude.sum(), (w.size if counts is None else counts)
    else:
        total = np.moveaxis(magnitude, axis, 0).reshape(w.shape[axis], -1).sum(axis=1)
        n = int(np.prod(w.shape)) // max(w.shape[axis], 1) if counts is None else np.asarray(counts, np.float64)
    # A channel of zeros keeps a positive scale: QuantizeLinear and a bias at input x weight scale
    # divide by it, and BipolarQuant gives back +scale only when scale > 0.
    scale = np.maximum(np.asarray(total / np.maximum(n, 1)), _MIN_SCALE).astype(np.float32)
    return q, scale, np.zeros(scale.shape, np.int64)


def quantize_float8(x: np.ndarray, dtype: str, ranges: tuple[np.ndarray, np.ndarray], axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float8 values, scale, zero point 0) of ``x``: max |x| per channel maps to the type's largest
    value; values are rounded to nearest-even in float8 and saturate, as QuantizeLinear does."""
    top = FLOAT8_DTYPES[dtype]
    scale, zp = affine_params(ranges[0], ranges[1], -int(top), int(top), True)
    s = scale if axis is None or scale.ndim == 0 else scale.reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    # The quotient in float32, then the format's saturating rounding: QuantizeLinear's arithmetic.
    q = FLOAT8_FORMATS[dtype].round(x.astype(np.float32) / s, saturate=True).astype(FLOAT8_NUMPY[dtype])
    return q, scale, zp


#: The number format of each float8 dtype name a target may give its tensors.
FLOAT8_FORMATS = {"float8e4m3fn": parse_format("e4m3fn"), "float8e5m2": parse_format("e5m2")}
#: The numpy (ml_dtypes) type each float8 dtype is stored in.
FLOAT8_NUMPY = {"float8e4m3fn": ml_dtypes.float8_e4m3fn, "float8e5m2": ml_dtypes.float8_e5m2}
#: The numpy type each stored dtype name travels in before ``ir.tensor`` packs it (4-bit values as
#: int8/uint8).
STORAGE_NUMPY = {"int4": np.int8, "uint4": np.uint8, "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32, **FLOAT8_NUMPY}


def stored_tensor(values: np.ndarray, dtype: str) -> ir.TensorProtocol:
    """``values`` (codes, zero points) as an ONNX tensor of the dtype named ``dtype`` (``int4``...)."""
    return ir.tensor(np.asarray(values).astype(STORAGE_NUMPY[dtype]), dtype=IR_TYPES[dtype])


def stored_bytes(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str) -> int:
    """Bytes an integer weight takes as stored: its codes and zero points at the dtype's width
    (zero points only where not all 0), float32 scales."""
    bits = INTEGER_DTYPES[dtype][2]
    zero_points = math.ceil(np.size(zero_point) * bits / 8) if np.any(zero_point) else 0
    return math.ceil(np.size(codes) * bits / 8) + np.size(scale) * 4 + zero_points


def _blocks(w: np.ndarray, axis: int, block: int):
    """``w`` as [blocks, block] rows along ``axis`` (zero-padded to whole blocks), and the inverse:
    restore(values) for [blocks, block] values, restore(params, blocked=True) for one per row,
    giving ``w``'s shape with ``axis`` counted in blocks (DequantizeLinear's blocked scale shape)."""
    moved = np.moveaxis(w, axis, -1)
    length = moved.shape[-1]
    count = -(-length // block)
    padded = np.zeros((*moved.shape[:-1], count * block), dtype=w.dtype)
    padded[..., :length] = moved

    def restore(values: np.ndarray, blocked: bool = False) -> np.ndarray:
        if blocked:
            return np.moveaxis(np.asarray(values).reshape(*moved.shape[:-1], count), -1, axis)
        return np.moveaxis(values.reshape(*moved.shape[:-1], count * block)[..., :length], -1, axis)

    return padded.reshape(-1, block), restore


def dequantize_weight(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, rule: TensorRule, axis: int | None) -> np.ndarray:
    """The float weight `quantize_weight`'s integers stand for (DequantizeLinear, blocks included)."""
    if rule.granularity == "per-block" and axis is not None:
        length = q.shape[axis]
        scale, zp = (np.take(np.repeat(p, rule.block_size, axis=axis), np.arange(length), axis=axis) for p in (scale, zp))
        return ((q - zp).astype(np.float32) * scale.astype(np.float32)).astype(np.float32)
    return dequantize(q, scale, zp, axis=axis)


def block_axis(node: ir.Node, weight_axis: int, rank: int) -> int:
    """The reduction axis of a weight, along which blocks of it share a scale: a Conv kernel's
    input channels, a MatMul's rows, the Gemm axis that is not the output channels."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if rank == 2:
        return 1 - weight_axis
    return rank - 2


def weight_axis(model: ir.Model, weight: str, rule: TensorRule) -> int | None:
    """The per-channel axis of ``weight``, or for per-block targets its block axis (None for
    per-tensor targets or unknown use)."""
    if rule.granularity == "per-tensor":
        return None
    for node in model.graph:
        roles = input_roles(node)
        if roles.weight is not None and roles.weight < len(node.inputs) and node.inputs[roles.weight] is not None and node.inputs[roles.weight].name == weight:
            if rule.granularity == "per-block":
                shape = node.inputs[roles.weight].const_value.shape if node.inputs[roles.weight].const_value is not None else None
                return block_axis(node, roles.weight_axis, len(shape)) if shape is not None and roles.weight_axis is not None else None
            return roles.weight_axis
    return None
