"""`quantize.weight_only`: int8 or int4 weights, float activations, run by packed CPU kernels.

Weights are quantized by round-to-nearest or GPTQ (`gptq.py`) into the weight-only layers of
`slimformer.layers.weight_only` (int8 per output channel; int4 per group of input columns),
which also says how they are packed, saved and run.

Settings that cannot change the model are normalized away (`group_size` at 8 bits, `act_order`
under round-to-nearest), so a study never measures the same model twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.layers.weight_only import Int4WeightLinear, Int8WeightLinear
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    Pass,
    PassContext,
    Phase,
    fixed,
    register_pass,
    searchable,
    setting_default,
)
from slimformer.passes.gptq import quantize_gptq, quantize_rtn
from slimformer.passes.layer_selection import (
    keep_sensitive,
    keep_sensitive_field,
    scope_field,
    select_layers,
)
from slimformer.passes.observers import visit_layer_inputs


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = searchable(
        4,
        Choice((4, 8)),
        "weight bits (int4: a scale and zero per group of input columns; int8: a scale per "
        "output channel)",
    )
    group_size: int = searchable(
        128, Choice((32, 64, 128)), "int4: input columns sharing one scale and zero"
    )
    method: str = searchable(
        "gptq",
        Choice(("rtn", "gptq")),
        "round-to-nearest, or GPTQ (error compensation through the inputs' Hessian)",
    )
    act_order: bool = searchable(
        False, Choice((False, True)), "GPTQ: quantize the columns with the largest inputs first"
    )
    scope: str = scope_field("which Linear layers inside the blocks")
    keep_sensitive: int = keep_sensitive_field(
        "the N layers whose quantization alone hurts the output most stay float"
    )
    damp: float = fixed(0.01, "GPTQ: fraction of the mean Hessian diagonal added for stability")
    skip: tuple[str, ...] = fixed((), "module names (or name prefixes) to keep in float")


def fitting_group(in_features: int, group_size: int) -> int | None:
    """`group_size`, or the largest power-of-two fraction of it (down to 32, the kernel's
    smallest) that divides `in_features` — e.g. 64 for SmolLM2's 576-wide projections."""
    group = group_size
    while group >= 32:
        if in_features % group == 0:
            return group
        group //= 2
    return None


def collect_hessians(
    model: SlimModel,
    block_index: int,
    layers: dict[str, nn.Linear],
    calibration: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """H = 2·XᵀX/n of each layer's inputs over the calibration tokens (padding excluded),
    with every earlier block as it is now (already quantized, as GPTQ prescribes)."""
    sums = {
        n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()
    }
    counts = dict.fromkeys(layers, 0)

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.double()
        sums[name] += x.T @ x
        counts[name] += x.shape[0]

    block = model.adapter.blocks()[block_index]
    visit_layer_inputs(model, layers, calibration, accumulate, stop_after=block)
    return {n: (2 * sums[n] / max(1, counts[n])).float() for n in layers}


def int4_refusal(config: WeightOnlyConfig):
    """Why a Linear cannot take int4 codes under `config` (None: it can)."""

    def refuse(name: str, module: nn.Module) -> str | None:
        if config.bits != 4:
            return None
        if fitting_group(module.in_features, config.group_size) is None:
            return f"{module.in_features} inputs not a multiple of 32"
        if module.out_features % 16:
            # aten's int4 packing takes output rows in multiples of 16.
            return f"{module.out_features} outputs not a multiple of 16"
        return None

    return refuse


@register_pass
class WeightOnly(Pass):
    name = "quantize.weight_only"
    summary = (
        "int8/int4 weights by round-to-nearest or GPTQ, packed for the int8/int4 CPU kernels "
        "(activations stay float)"
    )
    config_class = WeightOnlyConfig
    phase = Phase.QUANTIZATION
    order = 2
    group = "quantizer"
    needs_calibration = True  # GPTQ's Hessians; round-to-nearest ignores it

    @classmethod
    def calibration_required(cls, config: WeightOnlyConfig) -> bool:
        return config.method == "gptq" or config.keep_sensitive > 0

    @classmethod
    def normalize(cls, config: WeightOnlyConfig) -> WeightOnlyConfig:
        changes: dict[str, Any] = {}
        if config.bits == 8:  # one scale per output channel: no groups
            changes["group_size"] = setting_default(config, "group_size")
        if config.method == "rtn":  # column order matters only to GPTQ's error feedback
            changes["act_order"] = setting_default(config, "act_order")
        return dataclasses.replace(config, **changes) if changes else config

    def apply(self, model: SlimModel, config: WeightOnlyConfig, ctx: PassContext) -> dict[str, Any]:
        if config.method == "gptq" and not ctx.calibration:
            raise SlimformerError("quantize.weight_only method=gptq needs calibration data")
        packed_type = Int4WeightLinear if config.bits == 4 else Int8WeightLinear
        selection = select_layers(model, config.scope, config.skip, refuse=int4_refusal(config))
        # int4 group size per layer, where it had to be smaller than asked
        groups = {
            name: fitting_group(module.in_features, config.group_size)
            for name, module in selection.layers.items()
            if config.bits == 4
        }
        # Sensitivity probes use round-to-nearest (GPTQ per probe would cost a Hessian each).
        sensitive = keep_sensitive(
            model,
            selection,
            config.keep_sensitive,
            lambda name, linear: packed_type.from_quantized(
                quantize_rtn(linear.weight, config.bits, groups.get(name, 0)), None
            ),
            ctx.calibration,
        )
        quantized = 0
        for index in range(model.adapter.num_layers):
            ctx.check_deadline(self.name)  # GPTQ takes minutes a block on larger models
            layers = selection.in_block(index)
            hessians = (
                collect_hessians(model, index, layers, list(ctx.calibration))
                if config.method == "gptq" and layers
                else {}
            )
            for name, linear in layers.items():
                group = groups.get(name, 0)
                if config.method == "gptq":
                    q = quantize_gptq(
                        linear.weight,
                        hessians[name],
                        config.bits,
                        group,
                        config.damp,
                        config.act_order,
                    )
                else:
                    q = quantize_rtn(linear.weight, config.bits, group)
                bias = None if linear.bias is None else linear.bias.detach().float().clone()
                model.module.set_submodule(name, packed_type.from_quantized(q, bias))
                quantized += 1
        smaller = {n: g for n, g in groups.items() if g != config.group_size and n not in sensitive}
        resolved: dict[str, Any] = {
            "quantized_layers": quantized,
            "kept_float": selection.kept_float,
        }
        if smaller:
            resolved["smaller_groups"] = smaller
        return resolved
