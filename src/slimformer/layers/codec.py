"""The layer codec registry: how each module type that transformers cannot rebuild from a config
is saved, loaded, counted and exported.

A layer module registers one `LayerCodec` beside its class, so everything that handles layers
(the checkpoint, measurement, the ONNX export) asks this registry and never the technique that
created the layer. Importing `slimformer.layers` imports every layer module, so the registry is
complete whenever any of it is reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Tensors = dict[str, torch.Tensor]


def linear_flops(module: nn.Module, rows: int) -> int:
    """2·rows·in·out: a GEMM of `rows` input rows, counted like a float one whatever its
    integer width (what torch's FlopCounterMode counts for nn.Linear)."""
    return 2 * rows * module.in_features * module.out_features


def linear_parameters(module: nn.Module) -> int:
    """in·out weights plus the bias: what the float Linear it replaced held."""
    bias = module.out_features if getattr(module, "bias", None) is not None else 0
    return module.in_features * module.out_features + bias


@dataclass(frozen=True)
class LayerCodec:
    """Everything slimformer needs to know about one non-standard layer type."""

    kind: str  # the name saved in slimformer.json; never changes once released
    module_type: type[nn.Module]
    # module -> (tensors, JSON-able meta) and back; the saved form is the layer's own, never a
    # kernel's packed layout.
    encode: Callable[[Any], tuple[Tensors, dict[str, Any]]]
    decode: Callable[[Tensors, dict[str, Any]], nn.Module]
    # Parameters as the float layer counted them (packed codes count one per weight).
    num_parameters: Callable[[Any], int] = linear_parameters
    # FLOPs of one call on `rows` input rows: the layer's own kernels are invisible to torch's
    # FLOP counter, or (when a layer unpacks its weight for a float GEMM) seen only sometimes,
    # so measurement counts these layers by this function alone.
    flops: Callable[[Any, int], int] = linear_flops
    # Why the layer cannot be exported to ONNX; None when it can.
    onnx_refusal: str | None = None


_CODECS: dict[str, LayerCodec] = {}


def register_codec(codec: LayerCodec) -> LayerCodec:
    if codec.kind in _CODECS:
        raise ValueError(f"layer codec {codec.kind} registered twice")
    _CODECS[codec.kind] = codec
    return codec


def codec_for(module: nn.Module) -> LayerCodec | None:
    """The codec of `module`'s exact type, or None for a module transformers rebuilds itself."""
    for codec in _CODECS.values():
        if type(module) is codec.module_type:
            return codec
    return None


def codec_of_kind(kind: str) -> LayerCodec | None:
    return _CODECS.get(kind)


def registered_codecs() -> list[LayerCodec]:
    return list(_CODECS.values())


def count_parameters(module: nn.Module) -> int:
    """Parameters including those packed inside codec layers; tied weights count once."""
    total = 0
    seen: set[int] = set()
    for sub in module.modules():
        codec = codec_for(sub)
        if codec is not None:
            total += codec.num_parameters(sub)
            continue
        for parameter in sub.parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return total
