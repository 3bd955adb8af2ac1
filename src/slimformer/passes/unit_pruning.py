"""What pruning FFN neurons (`prune.ffn`) and attention heads (`prune.heads`) share: their
criterion and allocation settings, and slicing a Linear down to the units kept."""

from __future__ import annotations

from typing import Any

from torch import nn

from slimformer.passes.base import Choice, searchable
from slimformer.passes.importance import CRITERIA


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


def needs_data(criterion: str) -> bool:
    """Whether a criterion measures on calibration data (magnitude reads the weights only)."""
    return criterion != "magnitude"
