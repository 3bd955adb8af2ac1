"""`quantize.dynamic_int8`: int8 weights, activations quantized on the fly per batch, run by
PyTorch's fbgemm/x86 int8 GEMM kernels — a real integer kernel, measured faster on AVX2 CPUs.

The layers are `slimformer.layers.DynamicInt8Linear`: their activation codes span the full 8 bits
wherever that GEMM sums them exactly (VNNI) and 7 bits elsewhere, decided by each process that
runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimformer.layers.dynamic_int8 import (
    activation_range,
    dynamic_int8_layer,
    quantize_dynamic_in_place,
)
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


@dataclass(frozen=True)
class DynamicInt8Config:
    scope: str = scope_field(
        "which Linear layers inside the blocks become int8 (ffn_out, the FFN down projection, "
        "sees the largest activation outliers)"
    )
    per_channel: bool = searchable(
        False, Choice((False, True)), "one weight scale per output channel instead of per tensor"
    )
    keep_sensitive: int = keep_sensitive_field(
        "the N layers whose quantization alone hurts the output most (lowest output SQNR on "
        "calibration data) stay fp32"
    )
    skip: tuple[str, ...] = fixed((), "module names (or name prefixes) to keep in fp32")


@register_pass
class DynamicInt8(Pass):
    name = "quantize.dynamic_int8"
    summary = "int8 Linear layers with per-batch activation scales (fbgemm/x86 int8 kernels)"
    config_class = DynamicInt8Config
    phase = Phase.QUANTIZATION
    order = 1
    group = "quantizer"
    needs_calibration = True  # for keep_sensitive

    @classmethod
    def calibration_required(cls, config: DynamicInt8Config) -> bool:
        return config.keep_sensitive > 0

    def apply(
        self, model: SlimModel, config: DynamicInt8Config, ctx: PassContext
    ) -> dict[str, Any]:
        selection = select_layers(model, config.scope, config.skip)
        sensitive = keep_sensitive(
            model,
            selection,
            config.keep_sensitive,
            lambda name, linear: dynamic_int8_layer(linear, config.per_channel),
            ctx.calibration,
        )
        quantize_dynamic_in_place(model.module, selection.names(), config.per_channel)
        # Where it was quantized; each process that runs the model decides again for itself.
        resolved: dict[str, Any] = {
            "quantized_layers": len(selection.layers),
            "activation_range": activation_range(),
        }
        if config.keep_sensitive:
            resolved["kept_sensitive"] = sensitive  # name -> output SQNR (dB) if quantized
        return resolved
