"""`prune.ffn`: remove FFN neurons (gate, up and down projections sliced together), the least
important first (`importance.py`), uniformly per layer or by one global ranking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimformer.adapters import ModelFacts
from slimformer.model import SlimModel
from slimformer.passes.base import (
    FloatRange,
    Interval,
    Pass,
    PassContext,
    Phase,
    fixed,
    register_pass,
    searchable,
)
from slimformer.passes.importance import choose_kept, keeps_every_unit, unit_scores
from slimformer.passes.unit_pruning import (
    allocation_field,
    criterion_field,
    needs_data,
    sliced_linear,
)


@dataclass(frozen=True)
class FFNPruneConfig:
    keep: float = searchable(
        0.75,
        FloatRange(0.25, 0.95, step=0.05),
        "fraction of FFN neurons kept",
        valid=Interval(0, 1, open_low=True),
        cheaper="lower",
    )
    criterion: str = criterion_field("neuron")
    allocation: str = allocation_field()
    multiple: int = fixed(
        16, "kept neurons per layer round to a multiple of this (for fast kernels)"
    )


@register_pass
class FFNPrune(Pass):
    name = "prune.ffn"
    summary = "remove FFN neurons (gate, up and down sliced together), least important first"
    config_class = FFNPruneConfig
    phase = Phase.STRUCTURE
    order = 1
    needs_calibration = True

    @classmethod
    def calibration_required(cls, config: FFNPruneConfig) -> bool:
        return needs_data(config.criterion)

    @classmethod
    def changes_nothing(cls, config: FFNPruneConfig, facts: ModelFacts) -> bool:
        sizes = [facts.intermediate_size] * facts.num_layers
        multiple = config.multiple
        return keeps_every_unit(config.keep, config.allocation, sizes, multiple, multiple)

    def apply(self, model: SlimModel, config: FFNPruneConfig, ctx: PassContext) -> dict[str, Any]:
        adapter = model.adapter
        layout = adapter.layout
        layers = range(adapter.num_layers)
        ffns = [adapter.ffn_linears(i) for i in layers]
        outs = [f["out"] for f in ffns]
        norms = []
        for f in ffns:
            into = sum(m.weight.detach().pow(2).sum(1) for role, m in f.items() if role != "out")
            norms.append(into.sqrt() * f["out"].weight.detach().norm(dim=0))
        ctx.progress(f"scoring FFN neurons ({config.criterion})")
        scores = unit_scores(
            model, ctx.calibration, config.criterion, outs, [o.in_features for o in outs], norms
        )
        kept = choose_kept(scores, config.keep, config.allocation, config.multiple, config.multiple)
        for index, keep in zip(layers, kept, strict=True):
            for path in layout.ffn_in:
                linear = adapter.blocks()[index].get_submodule(path)
                adapter.replace_linear(index, path, sliced_linear(linear, rows=keep))
            linear = adapter.blocks()[index].get_submodule(layout.ffn_out)
            adapter.replace_linear(index, layout.ffn_out, sliced_linear(linear, cols=keep))
        adapter.fold_uniform_widths()
        return {"kept_neurons": [len(k) for k in kept]}
