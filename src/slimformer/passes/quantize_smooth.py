"""`quantize.smooth`: SmoothQuant (Xiao et al., 2023) — move activation outliers into weights.

Transformer activations have a few channels with outliers that ruin a per-tensor int8 scale;
weights do not. For each input channel j of a Linear, with a_j = max|x_j| over calibration
tokens and w_j = max|W[:, j]|, the smoothing factor s_j = a_j^α / w_j^(1-α) rewrites
x·Wᵀ = (x/s)·(W·diag(s))ᵀ: same function, flatter activations, slightly rougher weights.

The paper folds 1/s into the preceding LayerNorm; that is only valid when the norm's output
feeds nothing else, which is false for post-LN encoders (BERT feeds it to the residual too).
Here 1/s is kept as a per-channel input multiplier (`slimformer.layers.SmoothedLinear`), which
`quantize.static_int8` folds into its activation quantization at no cost — so the pass works
for every family and needs the static int8 pass after it (a recipe without one is rejected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from slimformer.layers.smoothed import SmoothedLinear
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    Interval,
    Pass,
    PassContext,
    Phase,
    register_pass,
    searchable,
)
from slimformer.passes.layer_selection import scope_field, select_layers
from slimformer.passes.observers import collect_input_stats


def smoothing_scales(
    activation_absmax: torch.Tensor, weight: torch.Tensor, alpha: float
) -> torch.Tensor:
    weight_absmax = weight.detach().abs().amax(0).float()
    scales = activation_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(
        1 - alpha
    )
    # Channels never active keep their scale: nothing to migrate.
    return torch.where(activation_absmax > 0, scales, torch.ones_like(scales)).clamp(1e-4, 1e4)


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float = searchable(
        0.5,
        Choice((0.5, 0.65, 0.8)),
        "migration strength α in s = max|x|^α / max|W|^(1-α) (higher moves more into weights)",
        valid=Interval(0, 1),
    )
    scope: str = scope_field("which Linear layers inside the blocks are smoothed")


@register_pass
class Smooth(Pass):
    name = "quantize.smooth"
    summary = "SmoothQuant: migrate activation outliers into the weights before static int8"
    config_class = SmoothConfig
    phase = Phase.QUANTIZATION
    order = 0  # before static int8, which folds the smoothing into its activation scales
    needs_calibration = True
    requires: ClassVar[tuple[str, ...]] = ("quantize.static_int8",)

    def apply(self, model: SlimModel, config: SmoothConfig, ctx: PassContext) -> dict[str, Any]:
        layers = select_layers(model, config.scope).layers
        stats = collect_input_stats(model, layers, list(ctx.calibration))
        largest = 0.0
        for name, linear in layers.items():
            if name not in stats:
                continue
            scales = smoothing_scales(stats[name].channel_absmax, linear.weight, config.alpha)
            with torch.no_grad():
                linear.weight.mul_(scales[None, :])
            model.module.set_submodule(name, SmoothedLinear(linear, 1 / scales))
            largest = max(largest, float(scales.max()))
        return {"smoothed_layers": len(layers), "largest_scale": round(largest, 3)}
