"""Shared names between the pass that assigns weight bit-widths and the passes that apply them."""

#: The facts key holding {weight initializer name: bits}, written by assign-precision, read by insert-qdq.
WEIGHT_BITS_FACT = "weight_bits"
