"""Numerics shared by several passes: uniform quantizers, scales, calibration observers."""
