"""Dynamic int8 Linear: int8 weights, activations quantized per call by fbgemm's int8 GEMM.

The activation codes span the full 8 bits wherever that GEMM sums them exactly (VNNI) and 7 bits
elsewhere, decided by each process that runs the model (`DynamicInt8Linear`), so nothing about
the range is saved.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
from torch.ao.quantization import (
    default_dynamic_qconfig,
    get_default_dynamic_quant_module_mappings,
    per_channel_dynamic_qconfig,
)

from slimformer.kernels import (
    FULL_ACTIVATION_RANGE,
    REDUCED_ACTIVATION_RANGE,
    dynamic_int8_gemm_saturates,
    dynamic_int8_linear,
)
from slimformer.layers.codec import LayerCodec, Tensors, register_codec


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


def dynamic_qconfig(per_channel: bool) -> Any:
    """torch's qconfig for int8 weights, one scale per output channel or per tensor."""
    return per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig


def activation_range() -> str:
    """How this process's dynamic int8 layers quantize their inputs (for `resolved`)."""
    return REDUCED_ACTIVATION_RANGE if dynamic_int8_gemm_saturates() else FULL_ACTIVATION_RANGE


def dynamic_int8_layer(linear: nn.Linear, per_channel: bool) -> DynamicInt8Linear:
    """One Linear as a dynamic-int8 module (the original is left untouched)."""
    probe = copy.copy(linear)
    probe.qconfig = dynamic_qconfig(per_channel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return DynamicInt8Linear.from_float(probe)


def quantize_dynamic_in_place(module: nn.Module, names: list[str], per_channel: bool) -> None:
    """Swap the Linear layers at `names` inside `module` for DynamicInt8Linear ones."""
    qconfig = dynamic_qconfig(per_channel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        torch.ao.quantization.quantize_dynamic(
            module,
            {n: qconfig for n in names},
            dtype=torch.qint8,
            mapping=DYNAMIC_INT8_MAPPING,
            inplace=True,
        )


# The saved form is torch's weights and bias, with nothing about the activation range: files
# written for torch's own dynamic Linear (before DynamicInt8Linear) load unchanged.
def _encode(module: DynamicInt8Linear) -> tuple[Tensors, dict[str, Any]]:
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


def _decode(tensors: Tensors, meta: dict[str, Any]) -> DynamicInt8Linear:
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


def _parameters(module: DynamicInt8Linear) -> int:
    bias = module.bias()
    return module.weight().numel() + (bias.numel() if bias is not None else 0)


register_codec(
    LayerCodec(
        kind="dynamic_int8_linear",
        module_type=DynamicInt8Linear,
        encode=_encode,
        decode=_decode,
        num_parameters=_parameters,
        onnx_refusal="fbgemm's dynamic int8 GEMM has no ONNX form",
    )
)
