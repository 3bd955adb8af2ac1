"""How important each FFN neuron and attention head is, measured on calibration data.

Four criteria, one number per unit (higher = keep):
- `magnitude`: weight norms of the unit's input rows times its output columns (no data);
- `activation`: mean |activation| of the unit on calibration tokens times the norm of its
  output weights (what the unit actually contributes, Wanda-style);
- `taylor`: first-order Taylor estimate of the loss change when the unit is removed,
  mean |Σ a·∂L/∂a| per input;
- `fisher`: the diagonal Fisher information of a mask on the unit, mean (Σ a·∂L/∂a)² per
  input — a second-order estimate of the loss change (Kwon et al., 2022).
The loss is next-token cross-entropy for causal LMs and ½‖last hidden state‖² otherwise (how
much the unit moves the model's output), so no labels are needed.

Scores come from masks: each unit's output is multiplied by a mask of ones inside a hook, and
the mask's gradient is exactly Σ a·∂L/∂a for that unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimformer.errors import SlimformerError

CRITERIA = ("magnitude", "activation", "taylor", "fisher")


def _loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**batch)
    if model.head == "causal-lm":
        logits = output.logits[:, :-1]
        targets = batch["input_ids"][:, 1:].clone()
        if "attention_mask" in batch:
            targets[batch["attention_mask"][:, 1:] == 0] = -100
        flat = logits.reshape(-1, logits.shape[-1])
        return nn.functional.cross_entropy(flat, targets.reshape(-1))
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    if "attention_mask" in batch and batch["attention_mask"].shape[1] == hidden.shape[1]:
        hidden = hidden * batch["attention_mask"].unsqueeze(-1)
    return 0.5 * hidden.pow(2).sum() / hidden.shape[0]


def unit_scores(
    model: Any,
    calibration: Sequence[dict[str, torch.Tensor]],
    criterion: str,
    modules: Sequence[nn.Linear],
    units: Sequence[int],
    weight_norms: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Scores for the units feeding each of `modules` (the output projections).

    `units[i]` is how many units module i's input splits into (neurons: in_features; heads:
    the number of heads); `weight_norms[i]` is the per-unit norm of the weights that produce
    and consume the unit (used by magnitude and activation).
    """
    if criterion not in CRITERIA:
        raise SlimformerError(f"unknown importance criterion '{criterion}'; choose {CRITERIA}")
    if criterion == "magnitude":
        return [n.float() for n in weight_norms]
    if not calibration:
        raise SlimformerError(f"the '{criterion}' criterion needs calibration data")
    totals = [torch.zeros(n) for n in units]
    count = 0
    parameters = [p for p in model.module.parameters() if p.requires_grad]
    for parameter in parameters:  # only the masks need gradients
        parameter.requires_grad_(False)
    try:
        count = _accumulate(model, calibration, criterion, modules, units, totals)
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
    scores = [t / count for t in totals]
    if criterion == "activation":
        scores = [s * n.float() for s, n in zip(scores, weight_norms, strict=True)]
    return scores


def _accumulate(
    model: Any,
    calibration: Sequence[dict[str, torch.Tensor]],
    criterion: str,
    modules: Sequence[nn.Linear],
    units: Sequence[int],
    totals: list[torch.Tensor],
) -> int:
    count = 0
    for batch in calibration:
        masks: list[torch.Tensor] = []
        hooks = []
        for module, n in zip(modules, units, strict=True):
            rows = next(iter(batch.values())).shape[0]
            mask = torch.ones(rows, 1, n, requires_grad=criterion != "activation")
            masks.append(mask)

            def pre_hook(mod, args, mask=mask, n=n, batch=batch):
                x = args[0]
                shaped = x.unflatten(-1, (n, x.shape[-1] // n))
                if criterion == "activation":
                    token_mask = batch.get("attention_mask")
                    norms = shaped.detach().norm(dim=-1)  # [B, T, n]
                    if token_mask is not None and token_mask.shape[1] == norms.shape[1]:
                        norms = norms * token_mask.unsqueeze(-1)
                        tokens = token_mask.sum()
                    else:
                        tokens = torch.tensor(norms.shape[0] * norms.shape[1])
                    mask.activation = norms.sum((0, 1)) / tokens  # type: ignore[attr-defined]
                    return None
                return ((shaped * mask.unsqueeze(-1)).flatten(-2),)

            hooks.append(module.register_forward_pre_hook(pre_hook))
        try:
            if criterion == "activation":
                with torch.inference_mode():
                    model(**batch)
            else:
                with torch.enable_grad():
                    _loss(model, batch).backward()
        finally:
            for handle in hooks:
                handle.remove()
        for index, mask in enumerate(masks):
            if criterion == "activation":
                totals[index] += mask.activation  # type: ignore[attr-defined]
            elif criterion == "taylor":
                totals[index] += mask.grad[:, 0].abs().sum(0)
            else:
                totals[index] += mask.grad[:, 0].pow(2).sum(0)
        count += next(iter(batch.values())).shape[0] if criterion != "activation" else 1
    return count


def _kept_count(count: int, size: int, multiple: int, minimum: int) -> int:
    count = max(minimum, multiple * round(count / multiple) if multiple > 1 else count)
    return min(size, count)


def keeps_every_unit(
    keep: float, allocation: str, sizes: Sequence[int], multiple: int, minimum: int
) -> bool:
    """Whether `choose_kept` keeps every unit of layers of these sizes, whatever the scores."""
    if allocation == "uniform":
        return all(_kept_count(round(keep * n), n, multiple, minimum) == n for n in sizes)
    return round(keep * sum(sizes)) >= sum(sizes)  # global: the budget is every unit


def choose_kept(
    scores: Sequence[torch.Tensor],
    keep: float,
    allocation: str,
    multiple: int,
    minimum: int,
) -> list[list[int]]:
    """Which units each layer keeps (sorted indices).

    `uniform`: every layer keeps the same fraction. `global`: one ranking across layers, so a
    layer keeps what it needs; scores are first divided by their layer's mean so layers of
    different scale compete fairly. Counts round to `multiple` and never drop below `minimum`.
    """
    sizes = [len(s) for s in scores]
    if allocation == "uniform":
        counts = [round(keep * n) for n in sizes]
    elif allocation == "global":
        normalized = [s / s.mean().clamp(min=1e-12) for s in scores]
        flat = torch.cat(normalized)
        budget = max(1, round(keep * len(flat)))
        threshold = flat.sort(descending=True).values[budget - 1]
        counts = [int((s >= threshold).sum()) for s in normalized]
    else:
        raise SlimformerError(f"unknown allocation '{allocation}'; choose uniform or global")
    kept = []
    for layer_scores, count, size in zip(scores, counts, sizes, strict=True):
        count = _kept_count(count, size, multiple, minimum)
        order = sorted(range(size), key=lambda i: (-float(layer_scores[i]), i))
        kept.append(sorted(order[:count]))
    return kept
