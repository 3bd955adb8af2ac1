"""Per-layer quantization sensitivity: how much the model's output suffers when only one
layer is quantized, measured as output SQNR on calibration inputs (lower = more fragile).

The quantization passes use it for mixed precision: their `keep_sensitive` setting (a search
dimension) leaves the N most fragile layers in float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from slimformer.model import SlimModel

SENSITIVITY_BATCHES = 2  # calibration batches per probe: one forward per candidate layer each

QuantizeLayer = Callable[[str, nn.Linear], nn.Module]


def model_output(model: SlimModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a task scores: logits when the model has them, else the last hidden state;
    padding positions dropped."""
    output = model(**batch)
    tensor = output.logits if getattr(output, "logits", None) is not None else output[0]
    mask = batch.get("attention_mask")
    if mask is not None and tensor.dim() == 3 and mask.shape == tensor.shape[:2]:
        tensor = tensor[mask.bool()]
    return tensor.float()


def output_sqnr(reference: Sequence[torch.Tensor], approx: Sequence[torch.Tensor]) -> float:
    """Signal-to-quantization-noise ratio of the outputs, in dB."""
    signal = sum(float(r.pow(2).sum()) for r in reference)
    noise = sum(float((r - a).pow(2).sum()) for r, a in zip(reference, approx, strict=True))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@torch.inference_mode()
def rank_layers(
    model: SlimModel,
    names: Sequence[str],
    quantize_layer: QuantizeLayer,
    calibration: Sequence[dict[str, torch.Tensor]],
) -> list[tuple[str, float]]:
    """(name, output SQNR with only that layer quantized), most sensitive first."""
    batches = list(calibration)[:SENSITIVITY_BATCHES]
    reference = [model_output(model, b) for b in batches]
    scores = []
    for name in names:
        original = model.module.get_submodule(name)
        model.module.set_submodule(name, quantize_layer(name, original))
        try:
            scores.append((name, output_sqnr(reference, [model_output(model, b) for b in batches])))
        finally:
            model.module.set_submodule(name, original)
    return sorted(scores, key=lambda item: item[1])


def most_sensitive(
    model: SlimModel,
    names: Sequence[str],
    count: int,
    quantize_layer: QuantizeLayer,
    calibration: Sequence[dict[str, torch.Tensor]],
) -> dict[str, float]:
    """The `count` layers (of `names`) that hurt the output most, with their SQNR in dB."""
    if count <= 0 or not names:
        return {}
    return {
        n: round(s, 2) for n, s in rank_layers(model, names, quantize_layer, calibration)[:count]
    }
