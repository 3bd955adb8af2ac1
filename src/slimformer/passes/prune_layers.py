"""`prune.layers`: remove whole transformer blocks, the least important first. Importance is
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

from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    Interval,
    IntRange,
    Pass,
    PassContext,
    Phase,
    register_pass,
    searchable,
)


@dataclass(frozen=True)
class LayerDropConfig:
    count: int = searchable(
        1,
        IntRange(1, lambda facts: max(1, facts.num_layers // 2), "1..layers/2"),
        "how many blocks to remove",
        valid=Interval(1, lambda facts: facts.num_layers - 1, label="[1, layers-1]"),
        cheaper="higher",
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
    phase = Phase.STRUCTURE
    order = 0  # before neurons and heads are scored: they are scored in the blocks that stay
    needs_calibration = True

    def apply(self, model: SlimModel, config: LayerDropConfig, ctx: PassContext) -> dict[str, Any]:
        layers = model.adapter.num_layers
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
