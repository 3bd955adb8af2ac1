"""`quantize.static_int8`: int8 weights and int8 activations with calibrated ranges.

Activations are quantized to uint8 with a scale and zero point fixed from calibration data
(`observers.py`: min-max, percentile or MSE), weights to symmetric int8 per output channel,
and each layer runs oneDNN's int8 GEMM (`onednn::qlinear_pointwise`, the kernel PyTorch's x86
inductor quantizer lowers to) with float32 output, called eagerly: no graph capture or compile
step, so every shape the task produces runs as it comes. Layers smoothed by `quantize.smooth`
have their 1/s folded into the activation quantization multiplier.

Weight codes span 8 bits (−127..127) where the GEMM sums int8 products exactly (VNNI) and 7
bits (−63..63) where it sums pairs of them in 16 bits and would saturate (`slimformer.kernels`).
The pass records the width in its `resolved` entry and the saved model in each layer; a model
with 8-bit weights loaded where the GEMM saturates has them re-rounded to 7 bits, with a
logged warning that its accuracy may differ slightly.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.checkpoint import ModuleCodec, register_codec
from slimformer.errors import SlimformerError
from slimformer.kernels import (
    FULL_WEIGHT_BITS,
    SATURATION_REASON,
    exact_weight_bits,
    int8_linear,
    pack_int8_weight,
)
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, fixed, register_pass, searchable
from slimformer.passes.observers import (
    OBSERVERS,
    InputStats,
    activation_range,
    collect_input_stats,
    uint8_params,
)
from slimformer.passes.quantize import SCOPES, scoped_layers
from slimformer.passes.sensitivity import most_sensitive
from slimformer.passes.smooth import SmoothedLinear


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


def static_int8_layer(
    module: nn.Module, stats: InputStats, observer: str, weight_bits: int | None = None
) -> StaticInt8Linear:
    """Quantize one Linear (or SmoothedLinear) given the statistics of its raw input, with
    `weight_bits`-bit weight codes (default: the widest this CPU's int8 GEMM sums exactly)."""
    bits = exact_weight_bits() if weight_bits is None else weight_bits
    if isinstance(module, SmoothedLinear):
        linear, inv_scale = module.linear, module.inv_scale.float()
    else:
        linear, inv_scale = module, torch.ones(module.in_features)
    # Range of what is quantized: the input after smoothing (inv_scale > 0 keeps the order).
    low = float((stats.channel_min * inv_scale).min())
    high = float((stats.channel_max * inv_scale).max())
    sample = stats.sample() * inv_scale
    scale, zero_point = uint8_params(*activation_range(sample, low, high, observer))
    weight_int8, weight_scales = symmetric_codes(linear.weight.detach().float(), bits)
    bias = None if linear.bias is None else linear.bias.detach().float().clone()
    return StaticInt8Linear(
        weight_int8, weight_scales, bias, scale, zero_point, inv_scale / scale, bits
    )


@dataclass(frozen=True)
class StaticInt8Config:
    scope: str = searchable(
        "all", Choice(tuple(SCOPES)), "which Linear layers inside the blocks become int8"
    )
    observer: str = searchable(
        "minmax",
        Choice(OBSERVERS),
        "activation range: full min-max, 0.01/99.99 percentiles, or the MSE-optimal clip",
    )
    keep_sensitive: int = searchable(
        0, Choice((0, 1, 2, 4)), "the N layers whose quantization alone hurts most stay float"
    )
    skip: tuple[str, ...] = fixed((), "module names (or name prefixes) to keep in float")


@register_pass
class StaticInt8(Pass):
    name = "quantize.static_int8"
    summary = "int8 weights and calibrated int8 activations (oneDNN int8 GEMM)"
    config_class = StaticInt8Config
    stage = 30
    needs_calibration = True
    # Measured (bench/results/isa.json): 1.47x fp32 throughput with VNNI, 0.97x (and 0.70x
    # batch-1) on oneDNN's AVX2 path, where 7-bit weights also cost accuracy.
    pays_off_only_with = {"": "vnni"}

    def apply(self, model: SlimModel, config: StaticInt8Config, ctx: PassContext) -> dict[str, Any]:
        if not ctx.calibration:
            raise SlimformerError("quantize.static_int8 needs calibration data")
        layers = scoped_layers(model, config.scope, config.skip, (nn.Linear, SmoothedLinear))
        stats = collect_input_stats(model, layers, list(ctx.calibration))
        bits = exact_weight_bits()
        # Built once: the sensitivity probes and the final model use the same layers.
        quantized = {
            name: static_int8_layer(module, stats[name], config.observer, bits)
            for name, module in layers.items()
            if name in stats
        }
        sensitive = most_sensitive(
            model,
            list(quantized),
            config.keep_sensitive,
            lambda name, module: quantized[name],
            ctx.calibration,
        )
        for name, layer in quantized.items():
            if name not in sensitive:
                model.module.set_submodule(name, layer)
        # Smoothed layers left in float (sensitive, skipped, outside scope) lose the wrapper.
        for name, module in list(model.module.named_modules()):
            if isinstance(module, SmoothedLinear):
                model.module.set_submodule(name, module.unwrap())
        resolved: dict[str, Any] = {
            "quantized_layers": len(quantized) - len(sensitive),
            "weight_bits": bits,
        }
        if bits < FULL_WEIGHT_BITS:
            resolved["why"] = SATURATION_REASON
        if config.keep_sensitive:
            resolved["kept_sensitive"] = sensitive
        return resolved


# --- saving ---------------------------------------------------------------------------------
def _encode(module: StaticInt8Linear) -> tuple[dict[str, torch.Tensor], dict]:
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


def _decode(tensors: dict[str, torch.Tensor], meta: dict) -> StaticInt8Linear:
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


def _weight_count(module: StaticInt8Linear) -> int:
    return module.weight_int8.numel() + (module.bias.numel() if module.bias is not None else 0)


register_codec(ModuleCodec("static_int8_linear", StaticInt8Linear, _encode, _decode, _weight_count))
