"""`quantize.static_int8`: int8 weights and int8 activations with calibrated ranges.

Activations are quantized to uint8 with a scale and zero point fixed from calibration data
(`observers.py`: min-max, percentile or MSE), weights to symmetric int8 per output channel, and
each layer becomes a `slimformer.layers.StaticInt8Linear` (oneDNN's int8 GEMM, called eagerly:
no graph capture or compile step, so every shape the task produces runs as it comes). Layers
smoothed by `quantize.smooth` have their 1/s folded into the activation quantization multiplier.

Weight codes span 8 bits where this CPU's int8 GEMM sums int8 products exactly (VNNI) and 7 bits
where it would saturate (`slimformer.kernels`); the pass records the width in its `resolved`
entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.kernels import FULL_WEIGHT_BITS, SATURATION_REASON, exact_weight_bits
from slimformer.layers.smoothed import SmoothedLinear
from slimformer.layers.static_int8 import StaticInt8Linear, symmetric_codes
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    Pass,
    PassContext,
    Phase,
    fixed,
    register_pass,
    searchable,
)
from slimformer.passes.layer_selection import (
    keep_sensitive,
    keep_sensitive_field,
    scope_field,
    select_layers,
)
from slimformer.passes.observers import (
    OBSERVERS,
    InputStats,
    activation_range,
    collect_input_stats,
    uint8_params,
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
    scope: str = scope_field("which Linear layers inside the blocks become int8")
    observer: str = searchable(
        "minmax",
        Choice(OBSERVERS),
        "activation range: full min-max, 0.01/99.99 percentiles, or the MSE-optimal clip",
    )
    keep_sensitive: int = keep_sensitive_field(
        "the N layers whose quantization alone hurts most stay float"
    )
    skip: tuple[str, ...] = fixed((), "module names (or name prefixes) to keep in float")


@register_pass
class StaticInt8(Pass):
    name = "quantize.static_int8"
    summary = "int8 weights and calibrated int8 activations (oneDNN int8 GEMM)"
    config_class = StaticInt8Config
    phase = Phase.QUANTIZATION
    order = 1
    group = "quantizer"
    needs_calibration = True
    # Measured (bench/results/isa.json): 1.47x fp32 throughput with VNNI, 0.97x (and 0.70x
    # batch-1) on oneDNN's AVX2 path, where 7-bit weights also cost accuracy.
    pays_off_only_with = {"": "vnni"}

    def apply(self, model: SlimModel, config: StaticInt8Config, ctx: PassContext) -> dict[str, Any]:
        if not ctx.calibration:
            raise SlimformerError("quantize.static_int8 needs calibration data")
        selection = select_layers(model, config.scope, config.skip, (nn.Linear, SmoothedLinear))
        stats = collect_input_stats(
            model, selection.layers, ctx.until_deadline(ctx.calibration, self.name)
        )
        bits = exact_weight_bits()
        # Built once: the sensitivity probes and the final model use the same layers. Layers
        # that saw no input (none of the calibration batches reached them) stay as they are.
        for name in [n for n in selection.layers if n not in stats]:
            selection.drop(name, "no calibration input reached it")
        quantized = {
            name: static_int8_layer(module, stats[name], config.observer, bits)
            for name, module in selection.layers.items()
        }
        sensitive = keep_sensitive(
            model,
            selection,
            config.keep_sensitive,
            lambda name, module: quantized[name],
            ctx.calibration,
        )
        for name in selection.layers:
            model.module.set_submodule(name, quantized[name])
        # Smoothed layers left in float (sensitive, skipped, outside scope) lose the wrapper.
        for name, module in list(model.module.named_modules()):
            if isinstance(module, SmoothedLinear):
                model.module.set_submodule(name, module.unwrap())
        resolved: dict[str, Any] = {
            "quantized_layers": len(selection.layers),
            "weight_bits": bits,
        }
        if bits < FULL_WEIGHT_BITS:
            resolved["why"] = SATURATION_REASON
        if config.keep_sensitive:
            resolved["kept_sensitive"] = sensitive
        return resolved
