"""Shared names between the pass that assigns weight bit-widths and the passes that apply them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qcompiler.targets.spec import TargetSpec

#: The facts key holding {weight initializer name: bits}, written by assign-precision, read by insert-qdq.
WEIGHT_BITS_FACT = "weight_bits"
#: The facts key holding the activation width (int) every quantized activation uses, written by
#: assign-precision{activation-bits=N}, read by insert-qdq (absent: the activation dtype's width).
ACTIVATION_BITS_FACT = "activation_bits"
#: The facts key holding {quantized node name: {input index: float array}}: the float weight and
#: bias each layer had before insert-qdq quantized them, read by the accuracy guard to put a
#: layer back in float.
FLOAT_LAYER_INPUTS_FACT = "float_layer_inputs"
#: The facts key holding {weight initializer name: `qcompiler.quant.weights.RoundedWeight`}: integer
#: codes a pass chose on the weight quantizer's own grid (adaround), written back into the
#: initializer as their float values; insert-qdq stores these codes instead of rounding again.
ROUNDED_WEIGHTS_FACT = "rounded_weights"
#: The facts key holding the float model as the user gave it (an ``onnx.ModelProto``), set by
#: `qcompiler.compile` before any pass runs: the reference a training pass distils from.
FLOAT_MODEL_FACT = "float_model"


def checked_activation_bits(target: TargetSpec, bits: int, pass_name: str) -> int:
    """``bits`` (0: the target's activation width) if the target can run activations that wide;
    else a QCError naming the ``activation-bits`` option of ``pass_name``."""
    from qcompiler.errors import QCError

    bits = bits or target.activations.bits
    if bits not in target.bits.activations:
        raise QCError(f"{bits}-bit activations are not allowed by target '{target.name}' (its [bits] activations: {list(target.bits.activations)})", pass_name=pass_name, option="activation-bits")
    if bits < target.activations.bits and target.activations.bits == 16:
        # Narrower widths are a Clip on the integer tensor; onnxruntime 1.32 has no 16-bit Clip.
        raise QCError(f"{bits}-bit activations inside {target.activations.dtype} need a Clip onnxruntime cannot run on 16-bit integers: use 16, or an 8-bit activation dtype", pass_name=pass_name, option="activation-bits")
    return bits
