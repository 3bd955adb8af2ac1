"""Greedy generation with the KV cache, through whatever serves the model (eager PyTorch, or an
engine whose served module keeps a cache: torch.compile, OpenVINO's stateful decoders).

A plain loop (prefill, then one token per call reusing `past_key_values`), not transformers'
`generate`, which needs the eager module: served modules only promise the forward call. The
loop also times what serving a decoder is judged by: time to first token (the prefill and the
first token's choice) and the seconds per later token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from slimformer.errors import SlimformerError

if TYPE_CHECKING:
    from slimformer.model import SlimModel


@dataclass(frozen=True)
class Generation:
    tokens: torch.Tensor  # [batch, new tokens]: the generated ids, prompt excluded
    first_token_s: float  # prefill + choosing the first new token
    step_s: list[float] = field(default_factory=list)  # each later token's call

    def decode_tokens_per_s(self) -> float:
        """New tokens per second after the first (the batch-1 decode speed)."""
        if not self.step_s:
            raise SlimformerError("decode speed needs at least two new tokens")
        return len(self.step_s) / sum(self.step_s)


@torch.inference_mode()
def greedy(model: SlimModel, input_ids: torch.Tensor, new_tokens: int) -> Generation:
    """`new_tokens` greedy tokens after the prompt `input_ids` [batch, length], no padding."""
    if new_tokens < 1:
        raise SlimformerError(f"new_tokens must be at least 1, got {new_tokens}")
    if model.head != "causal-lm":
        raise SlimformerError(f"generation needs a causal-lm model, this one is {model.head}")
    started = time.perf_counter()
    output = model(input_ids=input_ids, use_cache=True)
    token = output.logits[:, -1:].argmax(-1)
    first = time.perf_counter() - started
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        began = time.perf_counter()
        output = model(input_ids=token, past_key_values=output.past_key_values, use_cache=True)
        token = output.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - began)
        tokens.append(token)
    return Generation(tokens=torch.cat(tokens, dim=1), first_token_s=first, step_s=steps)
