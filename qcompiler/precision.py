"""Shared names between the pass that assigns weight bit-widths and the passes that apply them."""

#: The facts key holding {weight initializer name: bits}, written by assign-precision, read by insert-qdq.
WEIGHT_BITS_FACT = "weight_bits"
#: The facts key holding the activation width (int) every quantized activation uses, written by
#: assign-precision{activation-bits=N}, read by insert-qdq (absent: the activation dtype's width).
ACTIVATION_BITS_FACT = "activation_bits"
#: The facts key holding {quantized node name: {input index: float array}}: the float weight and
#: bias each layer had before insert-qdq quantized them, read by the accuracy guard to put a
#: layer back in float.
FLOAT_LAYER_INPUTS_FACT = "float_layer_inputs"
#: The facts key holding {weight initializer name: `qcompiler.sensitivity.RoundedWeight`}: integer
#: codes a pass chose on the weight quantizer's own grid (adaround), written back into the
#: initializer as their float values; insert-qdq stores these codes instead of rounding again.
ROUNDED_WEIGHTS_FACT = "rounded_weights"
#: The facts key holding the float model as the user gave it (an ``onnx.ModelProto``), set by
#: `qcompiler.compile` before any pass runs: the reference a training pass distils from.
FLOAT_MODEL_FACT = "float_model"
