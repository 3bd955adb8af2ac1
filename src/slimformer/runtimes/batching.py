"""`runtime.batching`: how a batch of variable-length inputs is formed and run.

- `padded`: inputs batched in arrival order, each batch padded to its longest input (what a
  Hugging Face pipeline does);
- `bucketed`: inputs sorted by length first, so each batch pads little (what
  sentence-transformers' `encode` does) — the default everywhere;
- `unpadded`: arrival order, and the model runs on real tokens only (ByteTransformer's
  padding-free transformer): embeddings, projections, FFN and LayerNorms see a packed
  [tokens, hidden] matrix; only the attention product is laid out per sequence, padded with
  a key mask. Outputs at real positions equal the padded computation's; pad positions are zero.

`unpadded` needs the PyTorch runtime and a post-norm encoder (BERT family, embedding head);
ONNX Runtime and OpenVINO take `padded` or `bucketed`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from slimformer.adapters import adapter_for
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, register_pass, searchable
from slimformer.runtimes.base import ServedModule, register_served

BATCHING = ("padded", "bucketed", "unpadded")


@register_served
class UnpaddedEncoder(ServedModule):
    """Serves a BERT-family encoder without computing on padding positions."""

    runtime = "unpadded"

    def __init__(self, module: nn.Module, head: str):
        super().__init__(module.config, head)
        self.module = module

    @property
    def eager(self) -> nn.Module:
        return self.module

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


@dataclass(frozen=True)
class BatchingConfig:
    mode: str = searchable(
        "bucketed",
        Choice(BATCHING),
        "padded: arrival order, pad to the longest; bucketed: sort by length first; "
        "unpadded: arrival order, compute on real tokens only",
    )


def check_unpadded_supported(model: SlimModel) -> None:
    if model.head != "embedding":
        raise SlimformerError(
            f"runtime.batching mode=unpadded serves embedding models; this one is {model.head}"
        )
    try:
        model.adapter.post_norm_block(0)
    except NotImplementedError:
        raise SlimformerError(
            f"runtime.batching mode=unpadded is implemented for BERT-family encoders, not "
            f"{model.adapter.family}"
        ) from None


@register_pass
class BatchingPass(Pass):
    name = "runtime.batching"
    summary = "padded, length-bucketed or padding-free (unpadded) batches of real inputs"
    config_class = BatchingConfig
    stage = 45  # before a runtime pass (ORT/OpenVINO refuse an unpadded model)

    @classmethod
    def applies_to(cls, model: SlimModel) -> bool:
        # Only embedding inputs vary in length here: decoders are timed on fixed windows.
        try:
            check_unpadded_supported(model)
        except SlimformerError:
            return False
        return True

    def apply(self, model: SlimModel, config: BatchingConfig, ctx: PassContext) -> dict[str, Any]:
        if config.mode == "unpadded":
            check_unpadded_supported(model)
            model.module = UnpaddedEncoder(model.module, model.head)
        model.batching = config.mode
        return {}
