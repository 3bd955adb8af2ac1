"""Structured pruning passes.

`prune.layers`: remove whole transformer blocks, the least important first. Importance is
measured on calibration data:
- `block_influence`: how much a block changes its input, 1 - cos(input, output) averaged over
  real tokens (ShortGPT's "block influence"); one forward pass.
- `removal_change`: how much the model's last hidden state moves when that block alone is
  skipped, 1 - cos(full, skipped) (FuseGPT's information lost on removal); one forward pass per
  block, slower but looks at the whole model.
The blocks are physically removed and the config updated, so plain transformers loads the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    FloatRange,
    IntRange,
    Pass,
    PassContext,
    fixed,
    register_pass,
    searchable,
)
from slimformer.passes.importance import CRITERIA, choose_kept, unit_scores


@dataclass(frozen=True)
class LayerDropConfig:
    count: int = searchable(
        1,
        IntRange(1, lambda facts: max(1, facts.num_layers // 2), "1..layers/2"),
        "how many blocks to remove",
    )
    criterion: str = searchable(
        "block_influence",
        Choice(("block_influence", "removal_change")),
        "how block importance is measured on calibration data",
    )


@register_pass
class LayerDrop(Pass):
    name = "prune.layers"
    summary = "remove whole blocks, least important first (importance measured on calibration data)"
    config_class = LayerDropConfig
    stage = 10
    needs_calibration = True

    def apply(self, model: SlimModel, config: LayerDropConfig, ctx: PassContext) -> dict[str, Any]:
        layers = model.adapter.num_layers
        if not 1 <= config.count < layers:
            raise SlimformerError(
                f"prune.layers: count must be between 1 and {layers - 1} for this "
                f"{layers}-layer model, got {config.count}"
            )
        if not ctx.calibration:
            raise SlimformerError("prune.layers needs calibration data; none was given")
        ctx.progress(f"scoring {layers} blocks ({config.criterion})")
        scores = block_importance(model, ctx.calibration, config.criterion)
        ranked = sorted(range(layers), key=lambda i: (scores[i], i))
        dropped = sorted(ranked[: config.count])
        model.adapter.keep_blocks([i for i in range(layers) if i not in dropped])
        return {"dropped_layers": dropped, "importance": [round(s, 6) for s in scores]}


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _token_mask(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Which positions are real tokens (padding excluded) — matched to the hidden length."""
    mask = batch.get("attention_mask")
    if mask is None or mask.shape[-1] != hidden.shape[1]:
        return torch.ones(hidden.shape[:2], dtype=torch.bool)
    return mask.bool()


def _masked_cosine_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    distance = 1 - F.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(distance[mask].mean())


@torch.inference_mode()
def block_importance(
    model: SlimModel, calibration: Sequence[dict[str, torch.Tensor]], criterion: str
) -> list[float]:
    """One score per block; higher = more important."""
    blocks = model.adapter.blocks()
    base = model.adapter.base
    if criterion == "block_influence":
        totals = [0.0] * len(blocks)
        for batch in calibration:
            seen: dict[int, float] = {}
            hooks = []
            for index, block in enumerate(blocks):

                def hook(module, args, kwargs, output, index=index, batch=batch, seen=seen):
                    hidden_in = _hidden_of(args, kwargs)
                    mask = _token_mask(batch, hidden_in)
                    seen[index] = _masked_cosine_distance(hidden_in, _first(output), mask)

                hooks.append(block.register_forward_hook(hook, with_kwargs=True))
            try:
                base(**batch)
            finally:
                for handle in hooks:
                    handle.remove()
            for index, value in seen.items():
                totals[index] += value
        return [t / len(calibration) for t in totals]
    if criterion == "removal_change":
        reference = [base(**batch).last_hidden_state for batch in calibration]
        scores = []
        for block in blocks:

            def skip(module, args, kwargs, output):
                hidden_in = _hidden_of(args, kwargs)
                if isinstance(output, tuple):
                    return (hidden_in, *output[1:])
                return hidden_in

            handle = block.register_forward_hook(skip, with_kwargs=True)
            try:
                change = 0.0
                for batch, ref in zip(calibration, reference, strict=True):
                    out = base(**batch).last_hidden_state
                    change += _masked_cosine_distance(ref, out, _token_mask(batch, ref))
            finally:
                handle.remove()
            scores.append(change / len(calibration))
        return scores
    raise SlimformerError(f"unknown importance criterion '{criterion}'")


# --- FFN neurons and attention heads ----------------------------------------------------------
def sliced_linear(
    linear: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None
) -> nn.Linear:
    """A smaller Linear holding only the kept output rows / input columns: real slicing."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight = nn.Parameter(weight.clone())
    if bias is not None:
        out.bias = nn.Parameter(bias.clone())
    return out


def criterion_field(unit: str) -> Any:
    return searchable("activation", Choice(CRITERIA), f"how {unit} importance is measured")


def allocation_field() -> Any:
    return searchable(
        "uniform", Choice(("uniform", "global")), "same fraction per layer, or one global ranking"
    )


@dataclass(frozen=True)
class FFNPruneConfig:
    keep: float = searchable(0.75, FloatRange(0.3, 0.95, step=0.05), "fraction of FFN neurons kept")
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
    stage = 11
    needs_calibration = True

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


@dataclass(frozen=True)
class HeadPruneConfig:
    keep: float = searchable(
        0.75,
        FloatRange(0.25, 0.875, step=0.125),
        "fraction of attention heads kept (for grouped-query attention: of KV groups)",
    )
    criterion: str = criterion_field("head")
    allocation: str = allocation_field()


@register_pass
class HeadPrune(Pass):
    name = "prune.heads"
    summary = "remove attention heads (whole KV groups with their query heads under GQA)"
    config_class = HeadPruneConfig
    stage = 12
    needs_calibration = True

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
