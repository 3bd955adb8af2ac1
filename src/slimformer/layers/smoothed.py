"""SmoothedLinear: a float Linear whose weights carry SmoothQuant's per-channel scales s, with
the inverse 1/s applied to its input (the same function as the original layer).

It exists only between `quantize.smooth` and `quantize.static_int8`, which folds 1/s into its
activation quantization and unwraps any smoothed layer it leaves in float, so it is never saved
and has no codec.
"""

from __future__ import annotations

import torch
from torch import nn


class SmoothedLinear(nn.Module):
    """linear(x · inv_scale), where `linear` already carries the scales in its weights."""

    def __init__(self, linear: nn.Linear, inv_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)

    def unwrap(self) -> nn.Linear:
        """The plain Linear again (scales divided back out of the weights)."""
        with torch.no_grad():
            self.linear.weight.mul_(self.inv_scale[None, :])
        return self.linear
