"""Layer types that passes swap into a model (quantized, smoothed and low-rank Linears), and
the codec registry that saves, loads, counts and exports them.

This package depends on torch, `slimformer.kernels` and `slimformer.errors` only: the
checkpoint, measurement and the ONNX export handle every layer through its codec without
importing the passes that create them. Each layer module registers its codec when imported, and
every one is imported here, so the registry is complete whenever this package is.
"""

from slimformer.layers import dynamic_int8, lowrank, smoothed, static_int8, weight_only  # noqa: F401
from slimformer.layers.codec import (
    LayerCodec,
    codec_for,
    codec_of_kind,
    count_parameters,
    linear_flops,
    register_codec,
    registered_codecs,
)
from slimformer.layers.dynamic_int8 import DynamicInt8Linear
from slimformer.layers.lowrank import LowRankLinear
from slimformer.layers.smoothed import SmoothedLinear
from slimformer.layers.static_int8 import StaticInt8Linear
from slimformer.layers.weight_only import Int4WeightLinear, Int8WeightLinear, QuantizedWeight

__all__ = [
    "DynamicInt8Linear",
    "Int4WeightLinear",
    "Int8WeightLinear",
    "LayerCodec",
    "LowRankLinear",
    "QuantizedWeight",
    "SmoothedLinear",
    "StaticInt8Linear",
    "codec_for",
    "codec_of_kind",
    "count_parameters",
    "linear_flops",
    "register_codec",
    "registered_codecs",
]
