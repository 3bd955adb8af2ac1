"""Weight-only int8 and int4 Linear layers: integer weights, float activations, packed CPU kernels.

int8 layers keep int8 rows with per-channel scales, the plain [out, in] layout
`aten._weight_int8pack_mm` reads. int4 layers keep their codes packed by
`aten._convert_weight_to_int4pack_for_cpu` for `aten._weight_int4pack_mm_for_cpu`, with
per-group scales and zeros. That packed layout depends on the instruction set the kernel
dispatches to (AVX-512, AVX2 and the plain C++ kernel each interleave output rows differently)
and may change between torch versions, so it is never saved:

- Saved int4 format (`INT4_LAYOUT`, described by `INT4_FORMAT` in slimformer.json): the codes as
  uint8 [out, in/2], row-major, two per byte with the even input column in the low nibble; scales
  and zeros as floats [out, in/group_size], with w = (code - 8)·scale + zero; and the bias. A
  model saved in the older CPU-specific layout (a "packed" tensor, no layout marker) is refused.
- At load the codes are packed for the running CPU's kernel; the resident module keeps only that
  packed tensor. Getting the codes back (saving, the many-rows path below) goes through the
  running kernel's packing permutation (`int4_codes.py`).

Measured on this project's CPU (bench/quant_kernels.py), the aten weight-only kernels are 5-15x
slower than an fp32 GEMM for one row and 40-80x slower for hundreds: weight-only quantization
is memory-only here. So that prompts and evaluation stay usable, an input of `UNPACK_ROWS` rows
or more unpacks the layer's weight to float for that one call (a transient copy of one layer,
freed after it) and runs the fp32 GEMM; the model's resident weights stay packed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimformer.errors import SlimformerError
from slimformer.layers.codec import LayerCodec, Tensors, register_codec
from slimformer.layers.int4_codes import (
    bytes_to_codes,
    codes_to_bytes,
    pack_int4_codes,
    unpack_int4_codes,
)

UNPACK_ROWS = 16
INT4_LAYOUT = "int4-codes/1"
INT4_FORMAT = (
    "int4 codes, 2 per byte row-major [out, in/2] (low nibble = even input column); "
    "w = (code - 8)*scale + zero per group of group_size input columns; "
    "scales and zeros float [out, in/group_size]"
)
OLD_INT4_LAYOUT = (
    "this model's int4 layers were saved by an older slimformer in a CPU-specific packed layout "
    "that other CPUs misread; re-create it from the original model with `slimformer apply "
    "<recipe.yaml> <model> --out DIR` (the saved folder's recipe.yaml is the recipe)"
)
NO_ONNX_FORM = "aten's packed weight-only kernels have no ONNX form"


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [out, in] weight as the packed CPU kernels consume it (what round-to-nearest
    and GPTQ produce):
    - int4: asymmetric, per group of `group_size` input columns: w ≈ q·scale + low, q ∈ [0, 15];
    - int8: symmetric per output channel: w ≈ q·scale, q ∈ [-127, 127]."""

    codes: torch.Tensor  # int32 [out, in]: 0..15 (int4) or -127..127 (int8)
    scales: torch.Tensor  # float32 [out, groups] (int4) or [out] (int8)
    lows: torch.Tensor | None  # float32 [out, groups] for int4; None for symmetric int8
    bits: int
    group_size: int  # input columns per scale; = in_features for per-channel int8

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.codes.float() * self.scales[:, None]
        scales = self.scales.repeat_interleave(self.group_size, dim=1)
        lows = self.lows.repeat_interleave(self.group_size, dim=1)
        return self.codes.float() * scales + lows


class Int4WeightLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b with W as packed int4 codes, through the int4 CPU kernel."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = (
            in_features,
            out_features,
            group_size,
        )
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [groups, out, 2]
        self.register_buffer("bias", bias)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
    ) -> Int4WeightLinear:
        """From codes [out, in] and scales and zeros [out, groups]: w = (code - 8)·scale + zero."""
        out_features, in_features = codes.shape
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        return cls(
            in_features, out_features, group_size, pack_int4_codes(codes), scales_and_zeros, bias
        )

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None) -> Int4WeightLinear:
        # The kernel computes (code - 8)·scale + zero, so zero = low + 8·scale.
        return cls.from_codes(q.codes, q.scales, q.lows + 8 * q.scales, q.group_size, bias)

    def codes(self) -> torch.Tensor:
        return unpack_int4_codes(self.packed, self.out_features)

    def row_scales_and_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros, [out, groups] each."""
        scales, zeros = self.scales_and_zeros.unbind(-1)
        return scales.T, zeros.T

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes().to(dtype) - 8
        scales, zeros = (t.to(dtype) for t in self.row_scales_and_zeros())
        grouped = codes.reshape(self.out_features, -1, self.group_size)
        return (grouped * scales[..., None] + zeros[..., None]).reshape(codes.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        if flat.shape[0] >= UNPACK_ROWS:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(flat, self.dequantized_weight(x.dtype), bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group_size, self.scales_and_zeros.to(x.dtype)
        )
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4, group={self.group_size}"


class Int8WeightLinear(nn.Module):
    """y = x · (W_int8 · scale)ᵀ + b through the int8 weight-only CPU kernel."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None) -> Int8WeightLinear:
        return cls(q.codes.to(torch.int8).contiguous(), q.scales.contiguous(), bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        if flat.shape[0] >= UNPACK_ROWS:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(flat, self.dequantized_weight(x.dtype), bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


# --- saving: int4 as plain codes (see the module docstring), int8 rows as they are ------------
def _encode_int4(module: Int4WeightLinear) -> tuple[Tensors, dict[str, Any]]:
    scales, zeros = module.row_scales_and_zeros()
    tensors = {"codes": codes_to_bytes(module.codes()), "scales": scales, "zeros": zeros}
    if module.bias is not None:
        tensors["bias"] = module.bias
    meta = {
        "layout": INT4_LAYOUT,
        "format": INT4_FORMAT,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "group_size": module.group_size,
    }
    return tensors, meta


def _decode_int4(tensors: Tensors, meta: dict[str, Any]) -> Int4WeightLinear:
    if meta.get("layout") != INT4_LAYOUT:
        if "packed" in tensors:
            raise SlimformerError(OLD_INT4_LAYOUT)
        raise SlimformerError(
            f"an int4 layer was saved in layout {meta.get('layout')!r}; this slimformer reads "
            f"{INT4_LAYOUT!r}"
        )
    return Int4WeightLinear.from_codes(
        bytes_to_codes(tensors["codes"]),
        tensors["scales"],
        tensors["zeros"],
        meta["group_size"],
        tensors.get("bias"),
    )


def _encode_int8(module: Int8WeightLinear) -> tuple[Tensors, dict[str, Any]]:
    tensors = {"weight_int8": module.weight_int8, "scales": module.scales}
    if module.bias is not None:
        tensors["bias"] = module.bias
    return tensors, {}


def _decode_int8(tensors: Tensors, meta: dict[str, Any]) -> Int8WeightLinear:
    return Int8WeightLinear(tensors["weight_int8"], tensors["scales"], tensors.get("bias"))


register_codec(
    LayerCodec(
        kind="int4_weight_linear",
        module_type=Int4WeightLinear,
        encode=_encode_int4,
        decode=_decode_int4,
        onnx_refusal=NO_ONNX_FORM,
    )
)
register_codec(
    LayerCodec(
        kind="int8_weight_linear",
        module_type=Int8WeightLinear,
        encode=_encode_int8,
        decode=_decode_int8,
        onnx_refusal=NO_ONNX_FORM,
    )
)
