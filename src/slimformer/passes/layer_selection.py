"""Which of a model's Linear layers a quantization pass converts: scope, skip list, layer type,
and the most sensitive layers kept in float (`keep_sensitive`) — one helper for every pass.

A scope names the adapter's linear roles it covers; a skip entry names a module or a prefix of
whole name parts. Layers come in block order, and every layer of the scope that is not chosen
is reported with the reason (a pass may record them in its `resolved` entry). A projection that
`factorize.lowrank` split into two factors is offered as those two Linears
(`<name>.down`, `<name>.up`), so quantization composes with factorization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimformer.layers.lowrank import PARTS, LowRankLinear
from slimformer.passes.base import Choice, Interval, searchable
from slimformer.passes.sensitivity import QuantizeLayer, most_sensitive

if TYPE_CHECKING:
    from slimformer.model import SlimModel

# scope -> the adapter's linear roles it covers
SCOPES = {
    "all": ("attention", "ffn_in", "ffn_out"),
    "all_but_ffn_out": ("attention", "ffn_in"),
    "attention": ("attention",),
    "ffn": ("ffn_in", "ffn_out"),
}
KEEP_SENSITIVE = (0, 1, 2, 4)

# Returns why a layer the scope covers cannot be converted, or None when it can.
Refusal = Callable[[str, nn.Module], str | None]


def scope_field(help: str) -> Any:
    return searchable("all", Choice(tuple(SCOPES)), help)


def keep_sensitive_field(help: str) -> Any:
    # Any count is valid (3 layers, or more than the scope holds: then all stay float).
    return searchable(0, Choice(KEEP_SENSITIVE), help, valid=Interval(0, None))


def skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


@dataclass
class LayerSelection:
    """The chosen layers (name -> module, block order) and the block each sits in; the others
    of the scope with why they stay as they are."""

    layers: dict[str, nn.Module] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.layers)

    def in_block(self, index: int) -> dict[str, nn.Module]:
        return {n: m for n, m in self.layers.items() if self.blocks[n] == index}

    def drop(self, name: str, why: str) -> None:
        del self.layers[name]
        del self.blocks[name]
        self.kept_float[name] = why


def select_layers(
    model: SlimModel,
    scope: str,
    skip: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    refuse: Refusal | None = None,
) -> LayerSelection:
    """The blocks' layers in `scope`, not skipped, of exactly one of `types` (a layer another
    pass already converted is left alone) and not refused."""
    adapter = model.adapter
    selection = LayerSelection()
    for index in range(adapter.num_layers):
        for name, module in _with_factors(adapter.block_linears(index, SCOPES[scope])):
            if skipped(name, skip):
                selection.kept_float[name] = "in skip list"
            elif type(module) not in types:
                selection.kept_float[name] = f"already {type(module).__name__}"
            elif refuse is not None and (why := refuse(name, module)) is not None:
                selection.kept_float[name] = why
            else:
                selection.layers[name] = module
                selection.blocks[name] = index
    return selection


def _with_factors(layers: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The layers, each low-rank one replaced by its two factors."""
    found = []
    for name, module in layers.items():
        if isinstance(module, LowRankLinear):
            found += [(f"{name}.{part}", getattr(module, part)) for part in PARTS]
        else:
            found.append((name, module))
    return found


def keep_sensitive(
    model: SlimModel,
    selection: LayerSelection,
    count: int,
    quantize_layer: QuantizeLayer,
    calibration: Sequence[dict[str, torch.Tensor]],
) -> dict[str, float]:
    """Take the `count` chosen layers whose quantization alone hurts the output most out of
    `selection`; return them with their output SQNR (dB) when quantized."""
    sensitive = most_sensitive(model, selection.names(), count, quantize_layer, calibration)
    for name, db in sensitive.items():
        selection.drop(name, f"sensitive (output SQNR {db} dB)")
    return sensitive
