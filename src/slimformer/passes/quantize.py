"""Quantization passes.

`quantize.dynamic_int8`: int8 weights, activations quantized on the fly per batch, run by
PyTorch's fbgemm/x86 int8 GEMM kernels — a real integer kernel, measured faster on AVX2 CPUs.
The activation codes span the full 8 bits wherever that GEMM sums them exactly (VNNI) and 7 bits
elsewhere, decided by each process that runs the model (`DynamicInt8Linear`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
from torch.ao.quantization import (
    default_dynamic_qconfig,
    get_default_dynamic_quant_module_mappings,
    per_channel_dynamic_qconfig,
)

from slimformer.checkpoint import ModuleCodec, register_codec
from slimformer.kernels import (
    FULL_ACTIVATION_RANGE,
    REDUCED_ACTIVATION_RANGE,
    dynamic_int8_gemm_saturates,
    dynamic_int8_linear,
)
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, fixed, register_pass, searchable
from slimformer.passes.sensitivity import most_sensitive

# scope -> the adapter's linear roles it covers
SCOPES = {
    "all": ("attention", "ffn_in", "ffn_out"),
    "all_but_ffn_out": ("attention", "ffn_in"),
    "attention": ("attention",),
    "ffn": ("ffn_in", "ffn_out"),
}


@dataclass(frozen=True)
class DynamicInt8Config:
    scope: str = searchable(
        "all",
        Choice(tuple(SCOPES)),
        "which Linear layers inside the blocks become int8 (ffn_out, the FFN down projection, "
        "sees the largest activation outliers)",
    )
    per_channel: bool = searchable(
        False, Choice((False, True)), "one weight scale per output channel instead of per tensor"
    )
    keep_sensitive: int = searchable(
        0,
        Choice((0, 1, 2, 4)),
        "the N layers whose quantization alone hurts the output most (lowest output SQNR on "
        "calibration data) stay fp32",
    )
    skip: tuple[str, ...] = fixed((), "module names (or name prefixes) to keep in fp32")


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def scoped_layers(
    model: SlimModel, scope: str, skip: tuple[str, ...], types: tuple[type[nn.Module], ...]
) -> dict[str, nn.Module]:
    """name -> module for the blocks' layers in `scope`, not skipped, of exactly these types
    (a layer another quantizer already converted is left alone)."""
    modules = dict(model.module.named_modules())
    return {
        name: modules[name]
        for name in model.adapter.block_linear_names(SCOPES[scope])
        if not skipped(name, skip) and type(modules[name]) in types
    }


class DynamicInt8Linear(DynamicQuantLinear):
    """torch's dynamic int8 Linear, but with 8-bit activation codes where they are exact.

    torch's always asks fbgemm for 7-bit activation codes (`reduce_range=True`), which only
    CPUs without VNNI need (their GEMM sums u8×s8 pairs in 16 bits) and which costs accuracy
    everywhere else. This one asks `kernels.dynamic_int8_gemm_saturates()` (probed once per
    process) at each call, so nothing about the range is stored: a model quantized on a VNNI
    CPU and loaded on an AVX2 one stays exact there, and vice versa. Weights, packing, copying
    and state dicts are torch's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params
        if packed.dtype == torch.qint8:
            y = dynamic_int8_linear(x, packed._packed_params, dynamic_int8_gemm_saturates())
        elif packed.dtype == torch.float16:
            y = torch.ops.quantized.linear_dynamic_fp16(x, packed._packed_params)
        else:
            raise RuntimeError("Unsupported dtype on dynamic quantized linear!")
        return y.to(x.dtype)


# torch's dynamic-quantization mapping, with its dynamic Linear replaced by ours.
DYNAMIC_INT8_MAPPING = {
    float_type: DynamicInt8Linear if quantized_type is DynamicQuantLinear else quantized_type
    for float_type, quantized_type in get_default_dynamic_quant_module_mappings().items()
}


def activation_range() -> str:
    """How this process's dynamic int8 layers quantize their inputs (for `resolved`)."""
    return REDUCED_ACTIVATION_RANGE if dynamic_int8_gemm_saturates() else FULL_ACTIVATION_RANGE


def dynamic_int8_layer(linear: nn.Linear, per_channel: bool) -> DynamicInt8Linear:
    """One Linear as a dynamic-int8 module (the original is left untouched)."""
    probe = copy.copy(linear)
    probe.qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return DynamicInt8Linear.from_float(probe)


@register_pass
class DynamicInt8(Pass):
    name = "quantize.dynamic_int8"
    summary = "int8 Linear layers with per-batch activation scales (fbgemm/x86 int8 kernels)"
    config_class = DynamicInt8Config
    stage = 30
    needs_calibration = True  # for keep_sensitive

    def apply(
        self, model: SlimModel, config: DynamicInt8Config, ctx: PassContext
    ) -> dict[str, Any]:
        names = [
            n
            for n in model.adapter.block_linear_names(SCOPES[config.scope])
            if not skipped(n, config.skip)
        ]
        sensitive = most_sensitive(
            model,
            names,
            config.keep_sensitive,
            lambda name, linear: dynamic_int8_layer(linear, config.per_channel),
            ctx.calibration,
        )
        names = [n for n in names if n not in sensitive]
        qconfig = per_channel_dynamic_qconfig if config.per_channel else default_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            torch.ao.quantization.quantize_dynamic(
                model.module,
                {n: qconfig for n in names},
                dtype=torch.qint8,
                mapping=DYNAMIC_INT8_MAPPING,
                inplace=True,
            )
        # Where it was quantized; each process that runs the model decides again for itself.
        resolved: dict[str, Any] = {
            "quantized_layers": len(names),
            "activation_range": activation_range(),
        }
        if config.keep_sensitive:
            resolved["kept_sensitive"] = sensitive  # name -> output SQNR (dB) if quantized
        return resolved


# The saved form is torch's weights and bias, with nothing about the activation range: files
# written for torch's own dynamic Linear (before DynamicInt8Linear) load unchanged.
def _encode_dynamic_linear(module: DynamicInt8Linear) -> tuple[dict[str, torch.Tensor], dict]:
    weight = module.weight()
    bias = module.bias()
    tensors = {"weight_int8": weight.int_repr()}
    if bias is not None:
        tensors["bias"] = bias.detach()
    meta: dict[str, Any] = {"in_features": module.in_features, "out_features": module.out_features}
    if weight.qscheme() == torch.per_tensor_affine:
        meta["qscheme"] = "per_tensor"
        tensors["scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
        tensors["zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
    else:
        meta["qscheme"] = "per_channel"
        meta["axis"] = weight.q_per_channel_axis()
        tensors["scale"] = weight.q_per_channel_scales().to(torch.float64)
        tensors["zero_point"] = weight.q_per_channel_zero_points().to(torch.int64)
    return tensors, meta


def _decode_dynamic_linear(tensors: dict[str, torch.Tensor], meta: dict) -> DynamicInt8Linear:
    ints = tensors["weight_int8"]
    if meta["qscheme"] == "per_tensor":
        weight = torch._make_per_tensor_quantized_tensor(
            ints, float(tensors["scale"][0]), int(tensors["zero_point"][0])
        )
    else:
        weight = torch._make_per_channel_quantized_tensor(
            ints, tensors["scale"], tensors["zero_point"], meta["axis"]
        )
    bias = tensors.get("bias")
    module = DynamicInt8Linear(
        meta["in_features"], meta["out_features"], bias_=bias is not None, dtype=torch.qint8
    )
    module.set_weight_bias(weight, bias)
    return module


def _dynamic_linear_parameters(module: DynamicInt8Linear) -> int:
    bias = module.bias()
    return module.weight().numel() + (bias.numel() if bias is not None else 0)


register_codec(
    ModuleCodec(
        kind="dynamic_int8_linear",
        module_type=DynamicInt8Linear,
        encode=_encode_dynamic_linear,
        decode=_decode_dynamic_linear,
        num_parameters=_dynamic_linear_parameters,
    )
)
