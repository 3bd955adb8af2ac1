"""Training through int8 rounding: `recover.distill int8_aware=true` lets the student learn
under the rounding that dynamic int8 serving applies, so what it recovers survives the
quantization after it (quantization-aware distillation, as in TernaryBERT and Q8BERT: float
weights trained with a straight-through estimator of the rounding).

The rounding imitated is ONNX Runtime's dynamic int8 (`runtime.onnxruntime int8=dynamic`), the
best int8 peer on CPUs without VNNI: every Linear's input quantized per batch to uint8 over its
[min, max] (DynamicQuantizeLinear), its weight per output channel to symmetric int8 — 7 bits
(±64) where the CPU lacks VNNI, as that pass quantizes there, else ±127 — and every embedding
table to uint8 over its [min, max] (its quantized Gather; where the optimizer fused the
embeddings' LayerNorm, ONNX Runtime rounds that norm's scale and shift too, which is not
imitated: on all-MiniLM-L6-v2 keeping the whole embedding float moved recall@10 of the int8
model by 0.004, 0.836 against 0.832, in one exploratory run on an AMX Xeon). OpenVINO's
NNCF int8 rounds alike (per-channel int8 weights, per-tensor activations) with ranges
calibrated once instead of per batch.

Written on torch's `fake_quantize_*` ops (their gradient is the straight-through estimator) and
`nn.utils.parametrize` (the optimizer keeps updating the float weight; removing the
parametrization leaves the trained float weight in place), because no packaged QAT flow
(torch.ao's, NNCF's) imitates ONNX Runtime's per-batch activation ranges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimformer import cpu


def weight_code_limit() -> int:
    """The largest int8 weight code dynamic int8 serving uses on this CPU."""
    return 127 if cpu.has_vnni() else 64


class _RoundedTable(nn.Module):
    """A parametrization: an embedding table as uint8 codes over its [min, max] give it back."""

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return round_activation(table)


class _RoundedWeight(nn.Module):
    """A parametrization: the weight as per-channel symmetric int8 codes would give it back."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / self.limit
        zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(
            weight, scale, zero, 0, -self.limit, self.limit
        )


def round_activation(x: torch.Tensor) -> torch.Tensor:
    """`x` as DynamicQuantizeLinear's uint8 codes over the batch's [min, max] (0 included)
    would give it back."""
    low = x.detach().min().clamp(max=0)
    high = x.detach().max().clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-12)
    zero = (-low / scale).round().clamp(0, 255).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero, 0, 255)


def _round_input(module: nn.Module, args: tuple) -> tuple:
    return (round_activation(args[0]), *args[1:])


@contextlib.contextmanager
def int8_rounding(module: nn.Module) -> Iterator[int]:
    """Within it every Linear of `module` computes through int8 rounding of its input and its
    weight (at this CPU's weight range), and every Embedding through rounding of its table;
    yields the count of Linears. On leaving, the modules are plain again with their (trained)
    float weights."""
    limit = weight_code_limit()
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    tables = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    hooks = []
    try:
        for linear in linears:
            parametrize.register_parametrization(linear, "weight", _RoundedWeight(limit))
            hooks.append(linear.register_forward_pre_hook(_round_input))
        for table in tables:
            parametrize.register_parametrization(table, "weight", _RoundedTable())
        yield len(linears)
    finally:
        for hook in hooks:
            hook.remove()
        for rounded in linears + tables:
            if parametrize.is_parametrized(rounded, "weight"):
                parametrize.remove_parametrizations(rounded, "weight", leave_parametrized=False)
