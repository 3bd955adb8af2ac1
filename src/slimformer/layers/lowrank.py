"""LowRankLinear: a Linear replaced by the product of two smaller ones, y = up(down(x)).

`down` maps the input to `rank` features (no bias), `up` maps them to the output (with the
original bias). Both are plain `nn.Linear` when `factorize.lowrank` creates them, so every
engine runs them as ordinary GEMMs (the ONNX export is two MatMuls), distillation trains them,
and the quantization passes convert each factor like any other Linear (`passes.layer_selection`
offers the factors in place of the container).

Saved form: the container's codec stores the float factors' weights and the shapes; a factor a
later pass converted (int8, say) is a codec layer of its own, saved and loaded under its own
name (`<layer>.down`, `<layer>.up`), which the checkpoint visits after the container. The
config cannot say "this projection has rank r", so such a model loads with `slimformer.load`
only, not with plain transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimformer.layers.codec import LayerCodec, Tensors, codec_for, linear_flops, register_codec

PARTS = ("down", "up")


class LowRankLinear(nn.Module):
    """up(down(x)): `down` [rank, in] without bias, `up` [out, rank] with the layer's bias."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down = down
        self.up = up

    @classmethod
    def from_factors(
        cls, up_weight: torch.Tensor, down_weight: torch.Tensor, bias: torch.Tensor | None
    ) -> LowRankLinear:
        """W ≈ up_weight @ down_weight ([out, rank] @ [rank, in]), float32 factors."""
        return cls(_linear(down_weight, None), _linear(up_weight, bias))

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly these tensors (no initialisation drawn)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=True)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=True)
    return layer


# --- saving ---------------------------------------------------------------------------------
def _encode(module: LowRankLinear) -> tuple[Tensors, dict[str, Any]]:
    tensors: Tensors = {}
    float_parts = []
    for part in PARTS:
        linear = getattr(module, part)
        if type(linear) is not nn.Linear:
            continue  # a codec layer: the checkpoint saves it under its own name
        float_parts.append(part)
        tensors[f"{part}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            tensors[f"{part}.bias"] = linear.bias.detach()
    meta = {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "rank": module.rank,
        "float_parts": float_parts,
    }
    return tensors, meta


def _decode(tensors: Tensors, meta: dict[str, Any]) -> LowRankLinear:
    shapes = {
        "down": (meta["rank"], meta["in_features"]),
        "up": (meta["out_features"], meta["rank"]),
    }
    parts = {}
    for part in PARTS:
        if part in meta["float_parts"]:
            parts[part] = _linear(tensors[f"{part}.weight"], tensors.get(f"{part}.bias"))
        else:
            # Placeholder on the meta device: the factor's own codec entry replaces it.
            out_features, in_features = shapes[part]
            parts[part] = nn.Linear(in_features, out_features, device="meta")
    return LowRankLinear(parts["down"], parts["up"])


def _flops(module: LowRankLinear, rows: int) -> int:
    """Both factors' GEMMs, each counted by its own codec when a later pass converted it."""
    total = 0
    for part in PARTS:
        linear = getattr(module, part)
        codec = codec_for(linear)
        total += codec.flops(linear, rows) if codec is not None else linear_flops(linear, rows)
    return total


register_codec(
    LayerCodec(
        kind="lowrank_linear",
        module_type=LowRankLinear,
        encode=_encode,
        decode=_decode,
        # The factors are modules of their own and count themselves.
        num_parameters=lambda module: 0,
        flops=_flops,
    )
)
