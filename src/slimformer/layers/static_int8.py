"""Static int8 Linear: uint8 activations with a calibrated scale × int8 weights, per channel.

Each layer runs oneDNN's int8 GEMM (`onednn::qlinear_pointwise`, the kernel PyTorch's x86
inductor quantizer lowers to) with float32 output, called eagerly. Weight codes span 8 bits
(−127..127) where the GEMM sums int8 products exactly (VNNI) and 7 bits (−63..63) where it sums
pairs of them in 16 bits and would saturate (`slimformer.kernels`). The saved layer records its
width; one with 8-bit codes loaded where the GEMM saturates is re-rounded to 7 bits, with a
logged warning that its accuracy may differ slightly.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from slimformer.kernels import (
    FULL_WEIGHT_BITS,
    SATURATION_REASON,
    exact_weight_bits,
    int8_linear,
    pack_int8_weight,
)
from slimformer.layers.codec import LayerCodec, Tensors, register_codec


def symmetric_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 codes in ±(2^(bits−1) − 1) of a float [out, in] weight, and
    their scales."""
    code_max = 2 ** (bits - 1) - 1
    scales = (weight.abs().amax(1) / code_max).clamp(min=1e-8)
    codes = torch.round(weight / scales[:, None]).clamp(-code_max, code_max).to(torch.int8)
    return codes, scales


class StaticInt8Linear(nn.Module):
    """uint8 activations (fixed scale, zero point) × int8 weights (per channel, codes of
    `weight_bits` bits) → float32."""

    def __init__(
        self,
        weight_int8: torch.Tensor,
        weight_scales: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: float,
        input_zero_point: int,
        input_multiplier: torch.Tensor,
        weight_bits: int = FULL_WEIGHT_BITS,
    ):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.weight_bits = int(weight_bits)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scales", weight_scales)
        self.register_buffer("bias", bias)
        # x · multiplier, rounded, is the uint8 code minus the zero point: 1/scale, times the
        # smoothing 1/s per channel when the layer was smoothed.
        self.register_buffer("input_multiplier", input_multiplier)
        self._prepack()

    def _prepack(self) -> None:
        # oneDNN's blocked weight layout: an opaque tensor, rebuilt (never saved or copied).
        self.packed = pack_int8_weight(self.weight_int8)
        self.weight_zero_points = torch.zeros(self.out_features, dtype=torch.int64)

    def __deepcopy__(self, memo: dict) -> StaticInt8Linear:
        return StaticInt8Linear(
            self.weight_int8.clone(),
            self.weight_scales.clone(),
            None if self.bias is None else self.bias.clone(),
            self.input_scale,
            self.input_zero_point,
            self.input_multiplier.clone(),
            self.weight_bits,
        )

    def with_weight_bits(self, bits: int) -> StaticInt8Linear:
        """The same layer with its weights re-rounded to `bits`-bit codes (the float weights
        are gone: the current codes times their scales stand for them)."""
        weight = self.weight_int8.float() * self.weight_scales[:, None]
        weight_int8, weight_scales = symmetric_codes(weight, bits)
        return StaticInt8Linear(
            weight_int8,
            weight_scales,
            self.bias,
            self.input_scale,
            self.input_zero_point,
            self.input_multiplier,
            bits,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.round(x * self.input_multiplier).add_(self.input_zero_point)
        codes = codes.clamp_(0, 255).to(torch.uint8)
        return int8_linear(
            codes,
            self.input_scale,
            self.input_zero_point,
            self.packed,
            self.weight_scales,
            self.weight_zero_points,
            self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"static uint8×int8 ({self.weight_bits}-bit weight codes)"
        )


# --- saving ---------------------------------------------------------------------------------
def _encode(module: StaticInt8Linear) -> tuple[Tensors, dict[str, Any]]:
    tensors = {
        "weight_int8": module.weight_int8,
        "weight_scales": module.weight_scales,
        "input_multiplier": module.input_multiplier,
    }
    if module.bias is not None:
        tensors["bias"] = module.bias
    return tensors, {
        "input_scale": module.input_scale,
        "input_zero_point": module.input_zero_point,
        "weight_bits": module.weight_bits,
    }


def _decode(tensors: Tensors, meta: dict[str, Any]) -> StaticInt8Linear:
    layer = StaticInt8Linear(
        tensors["weight_int8"],
        tensors["weight_scales"],
        tensors.get("bias"),
        meta["input_scale"],
        meta["input_zero_point"],
        tensors["input_multiplier"],
        # Files saved before the marker existed hold 8-bit weight codes.
        meta.get("weight_bits", FULL_WEIGHT_BITS),
    )
    bits = exact_weight_bits()
    if layer.weight_bits <= bits:
        return layer
    _report_fewer_weight_bits(layer.weight_bits, bits)
    return layer.with_weight_bits(bits)


# Logged, not warned: checkpoint loading silences warnings (transformers' noise). Cached so
# that a model's dozens of layers say it once.
@functools.cache
def _report_fewer_weight_bits(saved_bits: int, bits: int) -> None:
    logging.getLogger(__name__).warning(
        "this model was quantized with %d-bit weight codes, but %s: its static int8 layers' "
        "weights are re-rounded to %d bits, so accuracy may differ slightly from where it was "
        "quantized",
        saved_bits,
        SATURATION_REASON,
        bits,
    )


register_codec(
    LayerCodec(
        kind="static_int8_linear",
        module_type=StaticInt8Linear,
        encode=_encode,
        decode=_decode,
        onnx_refusal="oneDNN's static int8 GEMM has no ONNX form",
    )
)
