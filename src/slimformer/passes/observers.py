"""Activation statistics on calibration data, and the range observers static int8 chooses from.

One forward pass over the calibration batches records, for the input of each chosen Linear,
its per-channel minimum and maximum over every (unpadded) token plus a sample of token rows.
The observers turn that into the clipping range of an asymmetric uint8 activation:
- `minmax`: the full range seen;
- `percentile`: the 0.01% and 99.99% quantiles (outliers clipped);
- `mse`: the fraction of the full range that minimizes the quantization error on the sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.model import SlimModel

SAMPLE_ROWS = 4096  # token rows kept per layer for the percentile and MSE observers
OBSERVERS = ("minmax", "percentile", "mse")
PERCENTILE = 0.9999
MSE_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


@dataclass
class InputStats:
    channel_min: torch.Tensor
    channel_max: torch.Tensor
    rows: list[torch.Tensor] = field(default_factory=list)
    kept_rows: int = 0

    @property
    def channel_absmax(self) -> torch.Tensor:
        return torch.maximum(self.channel_max.abs(), self.channel_min.abs())

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.channel_min.numel())


class _StopForward(Exception):
    """Raised after the module whose inputs were wanted, to skip the rest of the model."""


@torch.inference_mode()
def visit_layer_inputs(
    model: SlimModel,
    layers: dict[str, nn.Module],
    calibration: Iterable[dict[str, torch.Tensor]],
    visit: Callable[[str, torch.Tensor], None],
    stop_after: nn.Module | None = None,
) -> None:
    """Run the calibration batches and call `visit(name, rows)` with each layer's input as a
    float32 [tokens, features] matrix, padding positions left out. With `stop_after`, the
    rest of the model is skipped once that module has run."""
    current_mask: list[torch.Tensor | None] = [None]

    def on_input(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                x = x[mask.bool()]
            visit(name, x.reshape(-1, x.shape[-1]).float())

        return hook

    def stop(module: nn.Module, args: tuple, output: object) -> None:
        raise _StopForward

    hooks = [m.register_forward_pre_hook(on_input(n)) for n, m in layers.items()]
    if stop_after is not None:
        hooks.append(stop_after.register_forward_hook(stop))
    try:
        for batch in calibration:
            current_mask[0] = batch.get("attention_mask")
            with contextlib.suppress(_StopForward):
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()


def collect_input_stats(
    model: SlimModel,
    layers: dict[str, nn.Module],
    calibration: Iterable[dict[str, torch.Tensor]],
) -> dict[str, InputStats]:
    stats: dict[str, InputStats] = {}

    def record(name: str, x: torch.Tensor) -> None:
        low, high = x.amin(0), x.amax(0)
        entry = stats.get(name)
        if entry is None:
            entry = stats[name] = InputStats(low.clone(), high.clone())
        else:
            torch.minimum(entry.channel_min, low, out=entry.channel_min)
            torch.maximum(entry.channel_max, high, out=entry.channel_max)
        room = SAMPLE_ROWS - entry.kept_rows
        if room > 0:
            entry.rows.append(x[:room].clone())
            entry.kept_rows += min(room, x.shape[0])

    visit_layer_inputs(model, layers, calibration, record)
    return stats


def uint8_params(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 covering [low, high] (which holds 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255, 1e-8)
    return scale, int(min(255, max(0, round(-low / scale))))


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


def activation_range(
    sample: torch.Tensor, full_low: float, full_high: float, observer: str
) -> tuple[float, float]:
    """The clipping range of `observer` for values whose full range is [full_low, full_high]
    and of which `sample` is a sample."""
    if observer == "minmax" or sample.numel() == 0:
        return full_low, full_high
    values = sample.flatten()
    if observer == "percentile":
        if values.numel() > 2**24:  # torch.quantile's limit
            values = values[torch.randperm(values.numel(), generator=torch.Generator())[: 2**24]]
        low = float(torch.quantile(values, 1 - PERCENTILE))
        high = float(torch.quantile(values, PERCENTILE))
        return low, high
    if observer == "mse":
        best, best_error = (full_low, full_high), float("inf")
        for fraction in MSE_FRACTIONS:
            low, high = full_low * fraction, full_high * fraction
            error = float((fake_quantize(values, *uint8_params(low, high)) - values).pow(2).mean())
            if error < best_error:
                best, best_error = (low, high), error
        return best
    raise ValueError(f"unknown observer {observer!r}; choose one of {OBSERVERS}")
