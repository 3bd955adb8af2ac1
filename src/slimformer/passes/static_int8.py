"""`quantize.static_int8`: int8 weights and int8 activations with calibrated ranges.

Activations are quantized to uint8 with a scale and zero point fixed from calibration data
(`observers.py`: min-max, percentile or MSE), weights to int8 per output channel, and each
layer runs oneDNN's int8 GEMM (`onednn::qlinear_pointwise`, the kernel PyTorch's x86 inductor
quantizer lowers to) with float32 output, called eagerly: no graph capture or compile step,
so every shape the task produces runs as it comes. Layers smoothed by `quantize.smooth` have
their 1/s folded into the activation quantization multiplier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.checkpoint import ModuleCodec, register_codec
from slimformer.errors import SlimformerError
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


class StaticInt8Linear(nn.Module):
    """uint8 activations (fixed scale, zero point) × int8 weights (per channel) → float32."""

    def __init__(
        self,
        weight_int8: torch.Tensor,
        weight_scales: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: float,
        input_zero_point: int,
        input_multiplier: torch.Tensor,
    ):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scales", weight_scales)
        self.register_buffer("bias", bias)
        # x · multiplier, rounded, is the uint8 code minus the zero point: 1/scale, times the
        # smoothing 1/s per channel when the layer was smoothed.
        self.register_buffer("input_multiplier", input_multiplier)
        self._prepack()

    def _prepack(self) -> None:
        # oneDNN's blocked weight layout: an opaque tensor, rebuilt (never saved or copied).
        self.packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
        self.weight_zero_points = torch.zeros(self.out_features, dtype=torch.int64)

    def __deepcopy__(self, memo: dict) -> StaticInt8Linear:
        return StaticInt8Linear(
            self.weight_int8.clone(),
            self.weight_scales.clone(),
            None if self.bias is None else self.bias.clone(),
            self.input_scale,
            self.input_zero_point,
            self.input_multiplier.clone(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.round(x * self.input_multiplier).add_(self.input_zero_point)
        codes = codes.clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            codes,
            self.input_scale,
            self.input_zero_point,
            self.packed,
            self.weight_scales,
            self.weight_zero_points,
            self.bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, static uint8×int8"


def static_int8_layer(module: nn.Module, stats: InputStats, observer: str) -> StaticInt8Linear:
    """Quantize one Linear (or SmoothedLinear) given the statistics of its raw input."""
    if isinstance(module, SmoothedLinear):
        linear, inv_scale = module.linear, module.inv_scale.float()
    else:
        linear, inv_scale = module, torch.ones(module.in_features)
    # Range of what is quantized: the input after smoothing (inv_scale > 0 keeps the order).
    low = float((stats.channel_min * inv_scale).min())
    high = float((stats.channel_max * inv_scale).max())
    sample = stats.sample() * inv_scale
    scale, zero_point = uint8_params(*activation_range(sample, low, high, observer))
    weight = linear.weight.detach().float()
    weight_scales = (weight.abs().amax(1) / 127).clamp(min=1e-8)
    weight_int8 = torch.round(weight / weight_scales[:, None]).clamp(-127, 127).to(torch.int8)
    bias = None if linear.bias is None else linear.bias.detach().float().clone()
    return StaticInt8Linear(weight_int8, weight_scales, bias, scale, zero_point, inv_scale / scale)


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

    def apply(self, model: SlimModel, config: StaticInt8Config, ctx: PassContext) -> dict[str, Any]:
        if not ctx.calibration:
            raise SlimformerError("quantize.static_int8 needs calibration data")
        layers = scoped_layers(model, config.scope, config.skip, (nn.Linear, SmoothedLinear))
        stats = collect_input_stats(model, layers, list(ctx.calibration))
        # Built once: the sensitivity probes and the final model use the same layers.
        quantized = {
            name: static_int8_layer(module, stats[name], config.observer)
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
        resolved: dict[str, Any] = {"quantized_layers": len(quantized) - len(sensitive)}
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
    return tensors, {"input_scale": module.input_scale, "input_zero_point": module.input_zero_point}


def _decode(tensors: dict[str, torch.Tensor], meta: dict) -> StaticInt8Linear:
    return StaticInt8Linear(
        tensors["weight_int8"],
        tensors["weight_scales"],
        tensors.get("bias"),
        meta["input_scale"],
        meta["input_zero_point"],
        tensors["input_multiplier"],
    )


def _weight_count(module: StaticInt8Linear) -> int:
    return module.weight_int8.numel() + (module.bias.numel() if module.bias is not None else 0)


register_codec(ModuleCodec("static_int8_linear", StaticInt8Linear, _encode, _decode, _weight_count))
