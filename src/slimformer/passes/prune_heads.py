"""`prune.heads`: remove attention heads, the least important first (`importance.py`); under
grouped-query attention whole KV groups go, with their query heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.adapters import ModelFacts
from slimformer.model import SlimModel
from slimformer.passes.base import (
    FloatRange,
    Interval,
    Pass,
    PassContext,
    Phase,
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
class HeadPruneConfig:
    keep: float = searchable(
        0.75,
        FloatRange(0.25, 0.875, step=0.125),
        "fraction of attention heads kept (for grouped-query attention: of KV groups)",
        valid=Interval(0, 1, open_low=True),
        cheaper="lower",
    )
    criterion: str = criterion_field("head")
    allocation: str = allocation_field()


@register_pass
class HeadPrune(Pass):
    name = "prune.heads"
    summary = "remove attention heads (whole KV groups with their query heads under GQA)"
    config_class = HeadPruneConfig
    phase = Phase.STRUCTURE
    order = 2
    needs_calibration = True

    @classmethod
    def calibration_required(cls, config: HeadPruneConfig) -> bool:
        return needs_data(config.criterion)

    @classmethod
    def changes_nothing(cls, config: HeadPruneConfig, facts: ModelFacts) -> bool:
        sizes = [facts.num_kv_heads] * facts.num_layers
        return keeps_every_unit(config.keep, config.allocation, sizes, 1, 1)

    def apply(self, model: SlimModel, config: HeadPruneConfig, ctx: PassContext) -> dict[str, Any]:
        adapter = model.adapter
        head_dim = adapter.head_dim()
        layers = range(adapter.num_layers)
        attention = [adapter.attention_linears(i) for i in layers]
        heads = [a["query"].out_features // head_dim for a in attention]
        groups = [a["key"].out_features // head_dim for a in attention]
        norms = [_head_norms(a, h, g) for a, h, g in zip(attention, heads, groups, strict=True)]
        ctx.progress(f"scoring attention heads ({config.criterion})")
        scores = unit_scores(
            model, ctx.calibration, config.criterion, [a["out"] for a in attention], heads, norms
        )
        # A KV group stands or falls with its query heads (transformers' repeat_kv order).
        group_scores = [
            s.reshape(g, h // g).sum(1) for s, h, g in zip(scores, heads, groups, strict=True)
        ]
        kept = choose_kept(group_scores, config.keep, config.allocation, 1, 1)
        lay = adapter.layout
        for index, keep_groups in zip(layers, kept, strict=True):
            per_group = heads[index] // groups[index]
            query_heads = [g * per_group + q for g in keep_groups for q in range(per_group)]
            q_rows = _rows(query_heads, head_dim)
            kv_rows = _rows(keep_groups, head_dim)
            a = attention[index]
            adapter.replace_linear(index, lay.query, sliced_linear(a["query"], rows=q_rows))
            adapter.replace_linear(index, lay.key, sliced_linear(a["key"], rows=kv_rows))
            adapter.replace_linear(index, lay.value, sliced_linear(a["value"], rows=kv_rows))
            adapter.replace_linear(index, lay.attention_out, sliced_linear(a["out"], cols=q_rows))
        adapter.fold_uniform_widths()
        return {
            "kept_heads": [len(k) * h // g for k, h, g in zip(kept, heads, groups, strict=True)]
        }


def _rows(units: list[int], size: int) -> list[int]:
    return [u * size + i for u in units for i in range(size)]


def _head_norms(attention: dict[str, nn.Linear], heads: int, groups: int) -> torch.Tensor:
    """Per query head: norm of the weights that make it (q; its group's k, v) × that use it (o)."""

    def per_unit(weight: torch.Tensor, units: int, dim: int) -> torch.Tensor:
        # dim 0: units are blocks of output rows; dim 1: blocks of input columns
        return weight.detach().pow(2).sum(1 - dim).reshape(units, -1).sum(1)

    q = per_unit(attention["query"].weight, heads, 0)
    kv = per_unit(attention["key"].weight, groups, 0)
    kv = kv + per_unit(attention["value"].weight, groups, 0)
    out = per_unit(attention["out"].weight, heads, 1)
    return (q + kv.repeat_interleave(heads // groups)).sqrt() * out.sqrt()
