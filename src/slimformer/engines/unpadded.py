"""A BERT-family encoder served without computing on padding (ByteTransformer's padding-free
transformer), still in eager PyTorch.

Embeddings, projections, FFN and LayerNorms see a packed [tokens, hidden] matrix of the real
tokens only; only the attention product is laid out per sequence, padded with a key mask.
Outputs at real positions equal the padded computation's; pad positions are zero. It needs a
post-norm encoder (the adapter's `post_norm_block`) and the embedding head.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from slimformer.adapters import adapter_for
from slimformer.engines.base import ServedModule, register_served

# Why an unpadded model cannot go to an exporting runtime (also the runtime passes' conflict).
EXPORT_REFUSAL = (
    "unpadded batching runs in PyTorch only; use runtime.batching mode=bucketed with an "
    "exported model"
)


@register_served
class UnpaddedEncoder(ServedModule):
    """Serves a BERT-family encoder without computing on padding positions."""

    runtime = "unpadded"
    engine = "eager"  # PyTorch's eager kernels do the math; only the batch layout differs

    def __init__(self, module: nn.Module, head: str):
        super().__init__(module.config, head)
        self.module = module

    @property
    def eager(self) -> nn.Module:
        return self.module

    def export_refusal(self) -> str:
        return EXPORT_REFUSAL

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> Any:
        adapter = adapter_for(self.module)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, length = input_ids.shape
        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # flat positions of real tokens
        hidden = adapter.embeddings()(input_ids=input_ids)
        x = hidden.reshape(batch * length, -1).index_select(0, real)
        keys_visible = attention_mask.bool()[:, None, None, :]
        head_dim = adapter.head_dim()
        for index in range(adapter.num_layers):
            block = adapter.post_norm_block(index)

            def per_sequence(packed: torch.Tensor) -> torch.Tensor:
                # [tokens, heads*dim] -> [batch, heads, length, dim], zeros at pads
                laid = packed.new_zeros(batch * length, packed.shape[-1])
                laid.index_copy_(0, real, packed)
                return laid.view(batch, length, -1, head_dim).transpose(1, 2)

            context = F.scaled_dot_product_attention(
                per_sequence(block.query(x)),
                per_sequence(block.key(x)),
                per_sequence(block.value(x)),
                attn_mask=keys_visible,
            )
            context = context.transpose(1, 2).reshape(batch * length, -1).index_select(0, real)
            x = block.attention_norm(block.attention_out(context) + x)
            x = block.ffn_norm(block.ffn_out(block.activation(block.ffn_in(x))) + x)
        out = x.new_zeros(batch * length, x.shape[-1]).index_copy_(0, real, x)
        return BaseModelOutput(last_hidden_state=out.view(batch, length, -1))

    def __deepcopy__(self, memo: dict) -> UnpaddedEncoder:
        return UnpaddedEncoder(copy.deepcopy(self.module, memo), self.head)

    def save_artifacts(self, folder: Path) -> dict[str, Any]:
        return {}

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> UnpaddedEncoder:
        return cls(module, head)
