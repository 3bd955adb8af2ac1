"""`quantize.weight_only`: int8 or int4 weights, float activations, run by packed CPU kernels.

Weights are quantized by round-to-nearest or GPTQ (`gptq.py`). int8 layers keep int8 rows with
per-channel scales, the plain [out, in] layout `aten._weight_int8pack_mm` reads. int4 layers keep
their codes packed by `aten._convert_weight_to_int4pack_for_cpu` for
`aten._weight_int4pack_mm_for_cpu`, with per-group scales and zeros. That packed layout depends on
the instruction set the kernel dispatches to (AVX-512, AVX2 and the plain C++ kernel each
interleave output rows differently) and may change between torch versions, so it is never saved:

- Saved int4 format (`INT4_LAYOUT`, described by `INT4_FORMAT` in slimformer.json): the codes as
  uint8 [out, in/2], row-major, two per byte with the even input column in the low nibble; scales
  and zeros as floats [out, in/group_size], with w = (code - 8)·scale + zero; and the bias. A
  model saved in the older CPU-specific layout (a "packed" tensor, no layout marker) is refused.
- At load the codes are packed for the running CPU's kernel; the resident module keeps only that
  packed tensor. Getting the codes back (saving, the many-rows path below) goes through the
  running kernel's packing permutation, learned once per weight shape by packing probe tensors.

Measured on this project's CPU (bench/kernels.py), the aten weight-only kernels are 5-15x
slower than an fp32 GEMM for one row and 40-80x slower for hundreds: weight-only quantization
is memory-only here. So that prompts and evaluation stay usable, an input of `UNPACK_ROWS` rows
or more unpacks the layer's weight to float for that one call (a transient copy of one layer,
freed after it) and runs the fp32 GEMM; the model's resident weights stay packed.
"""

from __future__ import annotations

import functools
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
INT4_LAYOUT = "int4-codes/1"
INT4_FORMAT = (
    "int4 codes, 2 per byte row-major [out, in/2] (low nibble = even input column); "
    "w = (code - 8)*scale + zero per group of group_size input columns; "
    "scales and zeros float [out, in/group_size]"
)


# aten's packing is today a fixed function of the dispatched instruction set (blocks of 64
# output rows under AVX-512, 32 under AVX2, each interleaved its own way), but probing the
# running kernel, rather than restating aten's C++ here, stays right on every dispatch level and
# through torch layout changes; a change that is no longer a rearrangement of codes is refused.
@functools.cache
def _int4_unpacking_order(out_features: int, in_features: int) -> torch.Tensor:
    """For each code in row-major order, the position of its nibble among the packed tensor's
    nibbles (`_nibbles`) under the running kernel's packing: int32 [out·in].

    Packs "digit" probes, where every code is one base-16 digit of its own row-major index, so
    the nibbles at each packed position spell out which code landed there."""
    count = out_features * in_features
    index = torch.arange(count, dtype=torch.int32).reshape(out_features, in_features)
    digits = 1
    while 16**digits < count:
        digits += 1
    source = torch.zeros(count, dtype=torch.int32)
    for digit in range(digits):
        probe = (index >> (4 * digit)) & 15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        source |= _nibbles(packed).to(torch.int32) << (4 * digit)
    hits = torch.bincount(source, minlength=count)
    if hits.numel() != count or not bool((hits == 1).all()):
        raise SlimformerError(
            f"torch {torch.__version__}'s int4 CPU packing of a {out_features}x{in_features} "
            "weight is not a rearrangement of its 4-bit codes; slimformer cannot read int4 "
            "weights back with this torch"
        )
    order = torch.empty(count, dtype=torch.int32)
    order[source.long()] = torch.arange(count, dtype=torch.int32)
    return order


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a packed uint8 tensor, flat: low then high nibble of each byte."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)


def pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (0..15) in the running CPU kernel's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def unpack_int4_codes(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Codes uint8 [out, in] from a tensor `pack_int4_codes` packed in this process."""
    in_features = packed.numel() * 2 // out_features
    order = _int4_unpacking_order(out_features, in_features)
    return _nibbles(packed).index_select(0, order).reshape(out_features, in_features)


def codes_to_bytes(codes: torch.Tensor) -> torch.Tensor:
    """The saved form of codes [out, in]: uint8 [out, in/2], even column in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def bytes_to_codes(data: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [out, in] from their saved form (`codes_to_bytes`)."""
    return _nibbles(data).reshape(data.shape[0], -1)


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
                elif config.bits == 4 and module.out_features % 16:
                    # aten's int4 packing takes output rows in multiples of 16.
                    kept_float[name] = f"{module.out_features} outputs not a multiple of 16"
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


# --- saving: int4 as plain codes (see the module docstring), int8 rows as they are ------------
OLD_INT4_LAYOUT = (
    "this model's int4 layers were saved by an older slimformer in a CPU-specific packed layout "
    "that other CPUs misread; re-create it from the original model with `slimformer apply "
    "<recipe.yaml> <model> --out DIR` (the saved folder's recipe.yaml is the recipe)"
)


def _encode_int4(module: Int4WeightLinear) -> tuple[dict[str, torch.Tensor], dict]:
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


def _decode_int4(tensors: dict[str, torch.Tensor], meta: dict) -> Int4WeightLinear:
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
