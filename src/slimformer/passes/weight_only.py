"""`quantize.weight_only`: int8 or int4 weights, float activations, run by packed CPU kernels.

Weights are quantized by round-to-nearest or GPTQ (`gptq.py`) and stored packed: int4 as two
codes per byte with per-group scales and zeros for `aten._weight_int4pack_mm_for_cpu`, int8 as
int8 rows with per-channel scales for `aten._weight_int8pack_mm`. The served module calls that
kernel directly for decode-sized inputs. The packed layout is the CPU kernel's (the CUDA int4
kernel wants another), so these modules run on CPU.

Measured on this project's CPU (bench/kernels.py), the aten weight-only kernels are 5-15x
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

from slimformer.checkpoint import ModuleCodec, register_codec
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, fixed, register_pass, searchable
from slimformer.passes.gptq import QuantizedWeight, quantize_gptq, quantize_rtn
from slimformer.passes.observers import visit_layer_inputs
from slimformer.passes.quantize import SCOPES, skipped
from slimformer.passes.sensitivity import most_sensitive

UNPACK_ROWS = 16
INT4_PACK_BLOCK = 64  # the CPU int4 pack interleaves blocks of 64 output rows


def unpack_int4_codes(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Codes [out, in] from `_convert_weight_to_int4pack_for_cpu`'s layout: per block of 64
    output rows and per input column, 32 bytes holding rows j (low nibble) and j+32 (high).
    Checked against the kernel by tests/test_weight_only.py, so a layout change fails there."""
    in_features = packed.shape[1] * 2
    blocks = packed.reshape(out_features // INT4_PACK_BLOCK, in_features, INT4_PACK_BLOCK // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [blocks, in, 64]
    return codes.permute(0, 2, 1).reshape(out_features, in_features)


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
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None) -> Int4WeightLinear:
        out_features, in_features = q.codes.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.contiguous(), 1)
        # The kernel computes (code - 8)·scale + zero, so zero = low + 8·scale.
        zeros = q.lows + 8 * q.scales
        scales_and_zeros = torch.stack([q.scales, zeros], dim=-1).transpose(0, 1).contiguous()
        return cls(in_features, out_features, q.group_size, packed, scales_and_zeros, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_int4_codes(self.packed, self.out_features).to(dtype) - 8
        scales, zeros = self.scales_and_zeros.to(dtype).unbind(-1)  # [groups, out] each
        grouped = codes.reshape(self.out_features, -1, self.group_size)
        return (grouped * scales.T[..., None] + zeros.T[..., None]).reshape(codes.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        if flat.shape[0] >= UNPACK_ROWS and self.out_features % INT4_PACK_BLOCK == 0:
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
    scope: str = searchable("all", Choice(tuple(SCOPES)), "which Linear layers inside the blocks")
    keep_sensitive: int = searchable(
        0,
        Choice((0, 1, 2, 4)),
        "the N layers whose quantization alone hurts the output most stay float",
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


@register_pass
class WeightOnly(Pass):
    name = "quantize.weight_only"
    summary = (
        "int8/int4 weights by round-to-nearest or GPTQ, packed for the int8/int4 CPU kernels "
        "(activations stay float)"
    )
    config_class = WeightOnlyConfig
    stage = 31
    needs_calibration = True  # GPTQ's Hessians; round-to-nearest ignores it

    def apply(self, model: SlimModel, config: WeightOnlyConfig, ctx: PassContext) -> dict[str, Any]:
        if config.method == "gptq" and not ctx.calibration:
            raise SlimformerError("quantize.weight_only method=gptq needs calibration data")
        adapter = model.adapter
        packed_type = Int4WeightLinear if config.bits == 4 else Int8WeightLinear
        kept_float: dict[str, str] = {}
        groups: dict[str, int] = {}  # int4 group size per layer, where it had to be smaller
        by_block: list[dict[str, nn.Linear]] = []
        for index in range(adapter.num_layers):
            layers: dict[str, nn.Linear] = {}
            for name, module in adapter.block_linears(index, SCOPES[config.scope]).items():
                if skipped(name, config.skip):
                    kept_float[name] = "in skip list"
                elif type(module) is not nn.Linear:
                    kept_float[name] = f"already {type(module).__name__}"
                elif (
                    config.bits == 4
                    and fitting_group(module.in_features, config.group_size) is None
                ):
                    kept_float[name] = f"{module.in_features} inputs not a multiple of 32"
                else:
                    layers[name] = module
                    if config.bits == 4:
                        groups[name] = fitting_group(module.in_features, config.group_size)
            by_block.append(layers)
        # Sensitivity probes use round-to-nearest (GPTQ per probe would cost a Hessian each).
        sensitive = most_sensitive(
            model,
            [n for layers in by_block for n in layers],
            config.keep_sensitive,
            lambda name, linear: packed_type.from_quantized(
                quantize_rtn(linear.weight, config.bits, groups.get(name, 0)), None
            ),
            ctx.calibration,
        )
        kept_float |= {n: f"sensitive (output SQNR {db} dB)" for n, db in sensitive.items()}
        quantized = 0
        for index, layers in enumerate(by_block):
            layers = {n: m for n, m in layers.items() if n not in sensitive}
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
        resolved: dict[str, Any] = {"quantized_layers": quantized, "kept_float": kept_float}
        if smaller:
            resolved["smaller_groups"] = smaller
        return resolved


# --- saving: the packed tensors go to safetensors as they are --------------------------------
def _encode_int4(module: Int4WeightLinear) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"packed": module.packed, "scales_and_zeros": module.scales_and_zeros}
    if module.bias is not None:
        tensors["bias"] = module.bias
    meta = {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "group_size": module.group_size,
    }
    return tensors, meta


def _decode_int4(tensors: dict[str, torch.Tensor], meta: dict) -> Int4WeightLinear:
    return Int4WeightLinear(
        meta["in_features"],
        meta["out_features"],
        meta["group_size"],
        tensors["packed"],
        tensors["scales_and_zeros"],
        tensors.get("bias"),
    )


def _encode_int8(module: Int8WeightLinear) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"weight_int8": module.weight_int8, "scales": module.scales}
    if module.bias is not None:
        tensors["bias"] = module.bias
    return tensors, {}


def _decode_int8(tensors: dict[str, torch.Tensor], meta: dict) -> Int8WeightLinear:
    return Int8WeightLinear(tensors["weight_int8"], tensors["scales"], tensors.get("bias"))


def _weight_count(module: nn.Module) -> int:
    bias = module.out_features if module.bias is not None else 0
    return module.in_features * module.out_features + bias


register_codec(
    ModuleCodec("int4_weight_linear", Int4WeightLinear, _encode_int4, _decode_int4, _weight_count)
)
register_codec(
    ModuleCodec("int8_weight_linear", Int8WeightLinear, _encode_int8, _decode_int8, _weight_count)
)
