"""The IR graph as a differentiable torch callable: forward, backward and double backward.

No source model is needed: each ONNX op maps to torch functions (the table `OPS`), and the graph
is evaluated node by node in order. Initializers become tensors that can be made trainable
(`TorchGraph.parameters` by name), so Hessian and training passes differentiate with respect to
the weights of any ONNX model. QuantizeLinear/DequantizeLinear use straight-through rounding, so
gradients flow through quantized graphs. An op outside the table is refused up front, naming the
op type and the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise QCError("the torch executor needs PyTorch: pip install torch==2.13.0 (the CPU build)") from exc

Tensor = torch.Tensor
OpFn = Callable[[ir.Node, list[Any]], list[Tensor]]
OPS: dict[str, OpFn] = {}

_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}
_IR_OF_TORCH = {t: i for i, t in _TORCH_DTYPES.items()}
# (qmin, qmax) of the integer types QuantizeLinear can produce, keyed by the zero point's dtype.
_QRANGE = {
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return value


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _opset(node: ir.Node) -> int:
    graph = node.graph
    model_opset = graph.opset_imports.get("", 1) if graph is not None else 1
    return node.version or model_opset


# -- elementwise ------------------------------------------------------------------------------
def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda node, x: [fn(x[0], x[1])]


OPS["Add"] = _binary(torch.add)
OPS["Sub"] = _binary(torch.sub)
OPS["Mul"] = _binary(torch.mul)
OPS["Pow"] = _binary(lambda a, b: torch.pow(a, b).to(a.dtype))
OPS["Equal"] = _binary(torch.eq)
OPS["Less"] = _binary(torch.lt)
OPS["Greater"] = _binary(torch.gt)


@op("Div")
def _div(node: ir.Node, x: list[Any]) -> list[Tensor]:
    a, b = x
    if not a.is_floating_point():  # ONNX integer division truncates
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Abs": torch.abs, "Identity": lambda t: t,
    "Not": torch.logical_not, "Floor": torch.floor, "Ceil": torch.ceil, "Reciprocal": torch.reciprocal,
}.items():
    OPS[_name] = (lambda f: (lambda node, x: [f(x[0])]))(_fn)


@op("Clip")
def _clip(node: ir.Node, x: list[Any]) -> list[Tensor]:
    lo = x[1] if len(x) > 1 and x[1] is not None else _attr(node, "min")
    hi = x[2] if len(x) > 2 and x[2] is not None else _attr(node, "max")
    out = x[0]
    if lo is not None:
        out = torch.maximum(out, torch.as_tensor(lo, dtype=out.dtype))
    if hi is not None:
        out = torch.minimum(out, torch.as_tensor(hi, dtype=out.dtype))
    return [out]


@op("LeakyRelu")
def _leaky_relu(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [F.leaky_relu(x[0], _attr(node, "alpha", 0.01))]


@op("HardSigmoid")
def _hard_sigmoid(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [torch.clamp(_attr(node, "alpha", 0.2) * x[0] + _attr(node, "beta", 0.5), 0.0, 1.0)]


@op("HardSwish")
def _hard_swish(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [x[0] * torch.clamp(x[0] / 6.0 + 0.5, 0.0, 1.0)]


@op("Gelu")
def _gelu(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [F.gelu(x[0], approximate=_attr(node, "approximate", "none"))]


@op("Where")
def _where(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [torch.where(x[0], x[1], x[2])]


@op("Max", "Min", "Sum", "Mean")
def _variadic(node: ir.Node, x: list[Any]) -> list[Tensor]:
    out = x[0]
    for t in x[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(node.op_type, torch.add)(out, t)
    return [out / len(x) if node.op_type == "Mean" else out]


@op("Cast")
def _cast(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [x[0].to(_TORCH_DTYPES[ir.DataType(_attr(node, "to"))])]


# -- linear algebra and convolution -------------------------------------------------------------
@op("MatMul")
def _matmul(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [torch.matmul(x[0], x[1])]


@op("Gemm")
def _gemm(node: ir.Node, x: list[Any]) -> list[Tensor]:
    a = x[0].t() if _attr(node, "transA", 0) else x[0]
    b = x[1].t() if _attr(node, "transB", 0) else x[1]
    y = _attr(node, "alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        y = y + _attr(node, "beta", 1.0) * x[2]
    return [y]


def _conv_padding(node: ir.Node, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX pads ``[b1, b2, ..., e1, e2, ...]``, resolving auto_pad."""
    n = len(kernel)
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(n):
            out = math.ceil(spatial[i] / strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto_pad == "SAME_UPPER" else big)
            pads_e.append(big if auto_pad == "SAME_UPPER" else small)
        return pads_b + pads_e
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(_attr(node, "pads", [0] * (2 * n)))


def _torch_pad_order(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1..bn, e1..en]`` -> torch's ``(bn, en, ..., b1, e1)`` (last dimension first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


@op("Conv")
def _conv(node: ir.Node, x: list[Any]) -> list[Tensor]:
    data, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    n = weight.dim() - 2
    kernel = list(weight.shape[2:])
    strides = _attr(node, "strides", [1] * n)
    dilations = _attr(node, "dilations", [1] * n)
    pads = _conv_padding(node, data.shape[2:], kernel, strides, dilations)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    if pads[:n] == pads[n:]:
        return [conv(data, weight, bias, strides, pads[:n], dilations, _attr(node, "group", 1))]
    data = F.pad(data, _torch_pad_order(pads))
    return [conv(data, weight, bias, strides, 0, dilations, _attr(node, "group", 1))]


@op("ConvTranspose")
def _conv_transpose(node: ir.Node, x: list[Any]) -> list[Tensor]:
    data, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    n = weight.dim() - 2
    strides = _attr(node, "strides", [1] * n)
    dilations = _attr(node, "dilations", [1] * n)
    group = _attr(node, "group", 1)
    output_padding = _attr(node, "output_padding", [0] * n)
    pads = list(_attr(node, "pads", [0] * (2 * n)))
    if _attr(node, "output_shape") is not None or _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise QCError("ConvTranspose with output_shape or auto_pad is not supported by the torch executor", node=node.name)
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    # Full output, then crop the pads (handles asymmetric pads, which torch cannot express).
    y = conv_t(data, weight, bias, strides, 0, output_padding, group, dilations)
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + n]) for i in range(n)]
    return [y[tuple(index)]]


@op("BatchNormalization")
def _batch_norm(node: ir.Node, x: list[Any]) -> list[Tensor]:
    return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False, eps=_attr(node, "epsilon", 1e-5))]


@op("LayerNormalization")
def _layer_norm(node: ir.Node, x: list[Any]) -> list[Tensor]:
    data = x[0]
    axis = _attr(node, "axis", -1) % data.dim()
    dims = tuple(range(axis, data.dim()))
    mean = data.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(((data - mean) ** 2).mean(dim=dims, keepdim=True) + _attr(node, "epsilon", 1e-5))
    # Scale and B broadcast against the normalized tail (they may be smaller than it).
    y = (data - mean) * inv_std * x[1]
    if len(x) > 2 and x[2] is not None:
        y = y + x[2]
    return [y, mean, inv_std]


@op("Softmax")
def _softmax(node: ir.Node, x: list[Any]) -> list[Tensor]:
    if _opset(node) >= 13:
        return [torch.softmax(x[0], dim=_attr(node, "axis", -1))]
    axis = _attr(node, "axis", 1) % x[0].dim()  # before opset 13: softmax over the flattened tail
    shape = x[0].shape
    return [torch.softmax(x[0].reshape(*shape[:axis], -1), dim=-1).reshape(shape)]


# -- pooling ----------------------------------------------------------------------------------
def _pool_args(node: ir.Node, data: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(_attr(node, "kernel_shape"))
    n = len(kernel)
    strides = _attr(node, "strides", [1] * n)
    dilations = _attr(node, "dilations", [1] * n)
    pads = _conv_padding(node, data.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads


def _pool_output_size(size: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int, ceil: bool) -> int:
    """ONNX pooling output length; with ceil_mode a window starting in the end padding is dropped."""
    span = (kernel - 1) * dilation + 1
    out = (size + pad_begin + pad_end - span) / stride + 1
    out = math.ceil(out) if ceil else math.floor(out)
    if ceil and (out - 1) * stride >= size + pad_begin:
        out -= 1
    return int(out)


def _crop_pool(y: Tensor, data: Tensor, kernel: list[int], strides: list[int], dilations: list[int], pads: list[int], ceil: bool) -> Tensor:
    n = len(kernel)
    sizes = [_pool_output_size(data.shape[2 + i], kernel[i], strides[i], dilations[i], pads[i], pads[i + n], ceil) for i in range(n)]
    return y[(slice(None), slice(None), *(slice(0, s) for s in sizes))]


@op("MaxPool")
def _max_pool(node: ir.Node, x: list[Any]) -> list[Tensor]:
    kernel, strides, dilations, pads = _pool_args(node, x[0])
    n = len(kernel)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    ceil = bool(_attr(node, "ceil_mode", 0))
    if pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return [pool(x[0], kernel, strides, pads[:n], dilations, ceil_mode=ceil)]
    data = F.pad(x[0], _torch_pad_order(pads), value=-math.inf)
    return [_crop_pool(pool(data, kernel, strides, 0, dilations, ceil_mode=ceil), x[0], kernel, strides, dilations, pads, ceil)]


@op("AveragePool")
def _avg_pool(node: ir.Node, x: list[Any]) -> list[Tensor]:
    kernel, strides, dilations, pads = _pool_args(node, x[0])
    n = len(kernel)
    if any(d != 1 for d in dilations):
        raise QCError("AveragePool with dilations is not supported by the torch executor", node=node.name)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    ceil = bool(_attr(node, "ceil_mode", 0))
    include = bool(_attr(node, "count_include_pad", 0))
    if pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return [pool(x[0], kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)]
    # Explicit pads: sum the windows, then divide by how many elements each window counts
    # (the pads too with count_include_pad; never what lies beyond the pads).
    padded = F.pad(x[0], _torch_pad_order(pads))
    mask = F.pad(torch.ones_like(x[0][:1, :1]), _torch_pad_order(pads), value=1.0 if include else 0.0)
    sums = _sum_pool(padded, kernel, strides, ceil)
    counts = _sum_pool(mask, kernel, strides, ceil)
    return [_crop_pool(sums / torch.clamp(counts, min=1.0), x[0], kernel, strides, dilations, pads, ceil)]


def _sum_pool(t: Tensor, kernel: list[int], strides: list[int], ceil: bool) -> Tensor:
    if len(kernel) == 1:  # avg_pool1d has no divisor_override: pool a [N, C, 1, L] view instead
        return F.avg_pool2d(t.unsqueeze(2), (1, kernel[0]), (1, strides[0]), 0, ceil_mode=ceil, divisor_override=1).squeeze(2)
    pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
    return pool(t, kernel, strides, 0, ceil_mode=ceil, divisor_override=1)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: ir.Node, x: list[Any]) -> list[Tensor]:
    dims = tuple(range(2, x[0].dim()))
    if node.op_type == "GlobalMaxPool":
        return [torch.amax(x[0], dim=dims, keepdim=True)]
    return [torch.mean(x[0], dim=dims, keepdim=True)]


# -- shapes and data movement -------------------------------------------------------------------
@op("Flatten")
def _flatten(node: ir.Node, x: list[Any]) -> list[Tensor]:
    axis = _attr(node, "axis", 1)
    axis = axis + x[0].dim() if axis < 0 else axis  # axis == rank is allowed: [N, 1]
    lead = int(np.prod(x[0].shape[:axis])) if axis else 1
    return [x[0].reshape(lead, -1)]


@op("Reshape")
def _reshape(node: ir.Node, x: list[Any]) -> list[Tensor]:
    shape = _ints(x[1])
    if not _attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(tuple(shape))]


@op("Transpose")
def _transpose(node: ir.Node, x: list[Any]) -> list[Tensor]:
    perm = _attr(node, "perm", list(reversed(range(x[0].dim()))))
    return [x[0].permute(*perm)]


@op("Concat")
def _concat(node: ir.Node, x: list[Any]) -> list[Tensor]:
    # ONNX allows empty 1-D inputs (an exporter's empty shape piece); torch.cat does not.
    parts = [t for t in x if t is not None and not (t.dim() == 1 and t.numel() == 0)]
    return [torch.cat(parts, dim=_attr(node, "axis"))]


@op("Split")
def _split(node: ir.Node, x: list[Any]) -> list[Tensor]:
    axis = _attr(node, "axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else _attr(node, "split")
    if sizes is None:
        parts = _attr(node, "num_outputs", len(node.outputs))
        dim = x[0].shape[axis]
        chunk = -(-dim // parts)
        sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    return list(torch.split(x[0], sizes, dim=axis))


@op("Slice")
def _slice(node: ir.Node, x: list[Any]) -> list[Tensor]:
    data = x[0]
    if _opset(node) < 10:
        starts, ends, axes, steps = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes"), None
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= data.dim()
        dim = data.shape[axis]
        if step > 0:
            start = max(0, min(dim, start + dim if start < 0 else start))
            end = max(0, min(dim, end + dim if end < 0 else end))
            index[axis] = slice(start, end, step)
        else:
            # Negative steps: slice the reversed axis, where position p maps to dim - 1 - p.
            start = max(0, min(dim - 1, start + dim if start < 0 else start))
            end = max(-1, min(dim - 1, end + dim if end < 0 else end))
            index[axis] = slice(dim - 1 - start, dim - 1 - end, -step)
            flips.append(axis)
    if flips:
        data = torch.flip(data, flips)
    return [data[tuple(index)]]


def _axes(node: ir.Node, x: list[Any], index: int) -> list[int] | None:
    if len(x) > index and x[index] is not None:
        return _ints(x[index])
    return _attr(node, "axes")


@op("Squeeze")
def _squeeze(node: ir.Node, x: list[Any]) -> list[Tensor]:
    axes = _axes(node, x, 1)
    if axes is None:
        return [x[0].squeeze()]
    out = x[0]
    for axis in sorted((a % out.dim() for a in axes), reverse=True):
        out = out.squeeze(axis)
    return [out]


@op("Unsqueeze")
def _unsqueeze(node: ir.Node, x: list[Any]) -> list[Tensor]:
    axes = _axes(node, x, 1)
    rank = x[0].dim() + len(axes)
    out = x[0]
    for axis in sorted(a % rank for a in axes):
        out = out.unsqueeze(axis)
    return [out]


@op("Gather")
def _gather(node: ir.Node, x: list[Any]) -> list[Tensor]:
    data, indices = x
    axis = _attr(node, "axis", 0) % data.dim()
    idx = torch.where(indices < 0, indices + data.shape[axis], indices).long()
    out = data.index_select(axis, idx.reshape(-1))
    return [out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))]


@op("Shape")
def _shape(node: ir.Node, x: list[Any]) -> list[Tensor]:
    dims = list(x[0].shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@op("Expand")
def _expand(node: ir.Node, x: list[Any]) -> list[Tensor]:
    shape = _ints(x[1])
    return [x[0] * torch.ones(shape, dtype=x[0].dtype)]  # ONNX Expand broadcasts both ways


@op("Pad")
def _pad(node: ir.Node, x: list[Any]) -> list[Tensor]:
    pads = _ints(x[1]) if len(x) > 1 and x[1] is not None else _attr(node, "pads")
    value = x[2] if len(x) > 2 and x[2] is not None else _attr(node, "value", 0.0)
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
    data = x[0]
    if axes is not None:  # opset 18: pads only for the listed axes
        full = [0] * (2 * data.dim())
        for i, axis in enumerate(axes):
            axis %= data.dim()
            full[axis], full[axis + data.dim()] = pads[i], pads[i + len(axes)]
        pads = full
    mode = _attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    torch_pads = _torch_pad_order(pads)
    if mode == "constant":
        fill = float(value.reshape(-1)[0]) if isinstance(value, Tensor) and value.numel() else float(value if not isinstance(value, Tensor) else 0.0)
        return [F.pad(data, torch_pads, value=fill)]
    # reflect/replicate pad only trailing spatial dims in torch: these modes pad N, C by 0 in practice.
    n = data.dim()
    spatial = torch_pads[: 2 * (n - 2)]
    if any(torch_pads[2 * (n - 2) :]):
        raise QCError(f"Pad mode {mode} on batch or channel axes is not supported by the torch executor", node=node.name)
    return [F.pad(data, spatial, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])]


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(node: ir.Node, x: list[Any]) -> list[Tensor]:
    uses_input = node.op_type == "ReduceSum" and _opset(node) >= 13 or _opset(node) >= 18
    axes = (_ints(x[1]) if len(x) > 1 and x[1] is not None else None) if uses_input else _attr(node, "axes")
    keep = bool(_attr(node, "keepdims", 1))
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return [x[0]]
        axes = list(range(x[0].dim()))
    dims = tuple(a % x[0].dim() for a in axes)
    fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}[node.op_type]
    return [fn(x[0], dim=dims, keepdim=keep)]


@op("Constant")
def _constant(node: ir.Node, x: list[Any]) -> list[Tensor]:
    for name, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        value = _attr(node, name)
        if value is not None:
            return [torch.as_tensor(np.array(value, dtype=dtype))]
    raise QCError("Constant without a supported value attribute", node=node.name)


@op("ConstantOfShape")
def _constant_of_shape(node: ir.Node, x: list[Any]) -> list[Tensor]:
    value = _attr(node, "value")
    fill = torch.as_tensor(np.asarray(value).reshape(-1)[0] if value is not None else np.float32(0))
    return [torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype)]


# -- quantization with straight-through gradients ----------------------------------------------
def _round_ste(t: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return t + (torch.round(t) - t).detach()


def _broadcast_param(p: Tensor, data: Tensor, axis: int) -> Tensor:
    if p.dim() == 0 or p.numel() == 1:
        return p.reshape(())
    shape = [1] * data.dim()
    shape[axis % data.dim()] = -1
    return p.reshape(shape)


def _integer_valued(zp: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero point as ``dtype``: a trained (float) one rounded straight-through, as it ships."""
    return _round_ste(zp) if zp.is_floating_point() and zp.requires_grad else zp.to(dtype)


@op("QuantizeLinear")
def _quantize(node: ir.Node, x: list[Any]) -> list[Tensor]:
    data, scale = x[0], x[1]
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = x[2] if len(x) > 2 and x[2] is not None else torch.zeros((), dtype=torch.uint8)
    # The declared type (int4/uint4 are held in 8-bit tensors here), else the tensor's own.
    qtype = zp_value.dtype if zp_value is not None and zp_value.dtype is not None else _IR_OF_TORCH.get(zp.dtype, ir.DataType.UINT8)
    qmin, qmax = _QRANGE[qtype]
    axis = _attr(node, "axis", 1)
    s = _broadcast_param(scale.to(data.dtype), data, axis)
    z = _broadcast_param(_integer_valued(zp, data.dtype), data, axis)
    # The integer result is kept as float values so gradients can pass (straight-through).
    return [torch.clamp(_round_ste(data / s) + z, qmin, qmax)]


@op("DequantizeLinear")
def _dequantize(node: ir.Node, x: list[Any]) -> list[Tensor]:
    data, scale = x[0], x[1]
    zp = x[2] if len(x) > 2 and x[2] is not None else torch.zeros((), dtype=scale.dtype)
    axis = _attr(node, "axis", 1)
    q = data.to(scale.dtype)
    block = _attr(node, "block_size", 0)
    if block:
        # Blocked (opset 21): scale and zero point hold one entry per block along ``axis``.
        axis %= q.dim()
        length = q.shape[axis]
        scale, zp = (torch.repeat_interleave(p, block, dim=axis).narrow(axis, 0, length) if p.dim() else p for p in (scale, zp.to(scale.dtype)))
        return [(q - zp) * scale]
    return [(q - _broadcast_param(_integer_valued(zp, scale.dtype), q, axis)) * _broadcast_param(scale, q, axis)]


# -- the executor -----------------------------------------------------------------------------
def check_supported(model: ir.Model) -> None:
    """Raise a `QCError` naming the first node whose op the executor cannot run."""
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            name = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            raise QCError(f"op type {name} is not supported by the torch executor", node=node.name or "<unnamed>")


class TorchGraph(torch.nn.Module):
    """An ONNX graph as a torch module: ``graph(input=x)`` returns the graph outputs in order.

    ``trainable`` names initializers that become `torch.nn.Parameter` (for gradients and Hessians
    with respect to weights); the rest are constant tensors.

    ``batchnorm_training``: every BatchNormalization normalizes with its batch's own statistics (as
    a network does while it trains) instead of its stored running ones. Low-bit training passes
    run so, since a weight whose quantization moves its channel's mean and variance needs the
    normalization that follows it to move too. With ``batchnorm_statistics`` set to a dict, each
    such BN also adds its batch's per-channel sums to it (see `BatchNormStatistics`).
    """

    def __init__(self, model: ir.Model, *, trainable: Iterable[str] = (), dtype: torch.dtype = torch.float32, batchnorm_training: bool = False) -> None:
        super().__init__()
        check_supported(model)
        self.model = model
        self.dtype = dtype
        self.batchnorm_training = batchnorm_training
        self.batchnorm_statistics: BatchNormStatistics | None = None
        self.input_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
        self.output_names = [v.name for v in model.graph.outputs]
        trainable = set(trainable)
        self.weights = torch.nn.ParameterDict()
        self.constants: dict[str, Tensor] = {}
        self._param_key: dict[str, str] = {}
        for name, value in model.graph.initializers.items():
            array = value.const_value.numpy()
            if value.const_value.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
                # ml_dtypes' int4/uint4 (one value per byte): torch has no such type; widen to int8/uint8.
                array = array.astype(np.uint8 if value.const_value.dtype == ir.DataType.UINT4 else np.int8)
            tensor = torch.from_numpy(np.array(array, copy=True))
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            if name in trainable and not tensor.is_floating_point():
                # A trained integer (a quantizer's zero point, LSQ+'s offset) trains as a float
                # rounded straight-through where it is used.
                tensor = tensor.to(dtype)
            if name in trainable:
                key = f"w{len(self._param_key)}"  # ParameterDict keys cannot hold '.' or '/'
                self._param_key[name] = key
                self.weights[key] = torch.nn.Parameter(tensor)
            else:
                self.constants[name] = tensor
        unknown = trainable - set(model.graph.initializers)
        if unknown:
            raise QCError(f"no initializer named '{sorted(unknown)[0]}' to train")

    def parameter(self, name: str) -> torch.nn.Parameter:
        """The trainable tensor of initializer ``name``."""
        return self.weights[self._param_key[name]]

    def named_weights(self) -> dict[str, torch.nn.Parameter]:
        """Trainable tensors by initializer name."""
        return {name: self.weights[key] for name, key in self._param_key.items()}

    def run(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None, overrides: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Evaluate the graph; return the requested values (default: the graph outputs) by name.

        ``overrides`` replaces intermediate values by name: a node whose outputs are all
        overridden is skipped (e.g. a codebook lookup replaced by the float weight it stands for).
        """
        env: dict[str, Tensor] = {}
        for name in self.input_names:
            if name not in feeds:
                raise QCError(f"no value for graph input '{name}'")
            value = feeds[name]
            if not isinstance(value, Tensor):
                value = np.asarray(value)
                # Batches of a memory-mapped .npz are read-only; torch warns about sharing them.
                value = torch.from_numpy(value if value.flags.writeable else value.copy())
            tensor = value
            env[name] = tensor.to(self.dtype) if tensor.is_floating_point() and tensor.dtype != self.dtype else tensor
        env.update(self.constants)
        for name, key in self._param_key.items():
            env[name] = self.weights[key]
        overrides = overrides or {}
        env.update(overrides)
        wanted = outputs if outputs is not None else self.output_names
        missing = {name for name in wanted if name not in env}
        for node in self.model.graph:
            if not missing:
                break  # the rest of the graph computes nothing that was asked for
            if node.outputs and all(v.name in overrides for v in node.outputs):
                continue
            args = [env[v.name] if v is not None and v.name in env else None for v in node.inputs]
            if self.batchnorm_training and node.op_type == "BatchNormalization":
                results = [self._batch_norm_training(node, args)]
            else:
                results = OPS[node.op_type](node, args)
            for value, result in zip(node.outputs, results):
                env[value.name] = result
                missing.discard(value.name)
            for value in node.outputs[len(results) :]:
                if value.name and (value.uses() or value.is_graph_output()):
                    raise QCError(f"output {value.index()} of {node.op_type} is not computed by the torch executor", node=node.name)
        return {name: env[name] for name in wanted}

    def _batch_norm_training(self, node: ir.Node, x: list[Any]) -> Tensor:
        """BatchNormalization with the batch's own mean and (biased) variance, per channel."""
        data = x[0]
        dims = [d for d in range(data.dim()) if d != 1]
        if self.batchnorm_statistics is not None:
            with torch.no_grad():
                self.batchnorm_statistics.add(node.name, data, dims)
        return F.batch_norm(data, None, None, x[1], x[2], training=True, eps=_attr(node, "epsilon", 1e-5))

    def forward(self, *args: Any, **kwargs: Any) -> list[Tensor]:
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        results = self.run(feeds)
        return [results[name] for name in self.output_names]


class BatchNormStatistics:
    """Per-channel input statistics of each BatchNormalization, summed over batches run in
    batch-statistics mode: what its running mean and variance are re-estimated from.

    The mean and variance are those of every sample seen (sums of x and x squared in float64),
    not a momentum average, so the result does not depend on the batch order."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[Tensor, Tensor, int]] = {}

    def add(self, name: str, data: Tensor, dims: list[int]) -> None:
        x = data.detach().to(torch.float64)
        count = x.numel() // max(x.shape[1], 1)
        s, ss, n = self._sums.get(name, (0.0, 0.0, 0))
        self._sums[name] = (s + x.sum(dims), ss + (x * x).sum(dims), n + count)

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """BN node name -> (mean, variance) per channel, float64."""
        out = {}
        for name, (s, ss, n) in self._sums.items():
            mean = s / n
            out[name] = (mean.numpy(), torch.clamp(ss / n - mean * mean, min=0).numpy())
        return out
