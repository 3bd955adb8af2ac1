"""`cast.half`: fp16 or bf16 weights and activations — a GPU technique.

On GPUs (and CPUs with AVX512-BF16 or AMX) 16-bit floats halve memory and run faster; on other
CPUs they halve memory but run slower, emulated. The study therefore leaves this pass out
unless it is named in --passes. It composes with weight-only int8/int4 (whose kernels take
16-bit activations) but not with dynamic int8, whose kernels take float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, Phase, register_pass, searchable

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HalfConfig:
    dtype: str = searchable("bfloat16", Choice(tuple(DTYPES)), "16-bit float type")


@register_pass
class Half(Pass):
    name = "cast.half"
    summary = "fp16/bf16 weights and activations (for GPUs; on most CPUs memory-only and slower)"
    config_class = HalfConfig
    phase = Phase.PRECISION
    searched_by_default = False
    # fp16 has no fast CPU path we serve at all; bf16 only with AVX-512 BF16 or AMX.
    pays_off_only_with = {"": "native_bf16"}

    def apply(self, model: SlimModel, config: HalfConfig, ctx: PassContext) -> dict[str, Any]:
        if any(isinstance(m, DynamicQuantLinear) for m in model.module.modules()):
            raise SlimformerError(
                "cast.half cannot follow quantize.dynamic_int8 (its kernels take float32); "
                "use quantize.weight_only with cast.half instead"
            )
        model.module.to(DTYPES[config.dtype])
        return {"dtype": config.dtype}
