"""BERT-family encoders: BERT, RoBERTa, XLM-R, ELECTRA, MiniLM (a BERT)."""

import torch
from torch import nn

from slimformer.adapters.base import BlockLayout, EncoderBlock, ModelAdapter
from slimformer.adapters.registry import register_adapter


@register_adapter
class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
    onnx_optimizer_type = "bert"
    block_paths = ("encoder.layer", "encoder.layers")
    layout = BlockLayout(
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_out="attention.output.dense",
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
    )

    def encoder_block(self, block_index: int) -> EncoderBlock:
        block = self.blocks()[block_index]
        attention = self.attention_linears(block_index)
        return EncoderBlock(
            query=attention["query"],
            key=attention["key"],
            value=attention["value"],
            attention_out=attention["out"],
            attention_norm=block.get_submodule("attention.output.LayerNorm"),
            ffn_in=block.get_submodule(self.layout.ffn_in[0]),
            activation=block.get_submodule("intermediate.intermediate_act_fn"),
            ffn_out=block.get_submodule(self.layout.ffn_out),
            ffn_norm=block.get_submodule("output.LayerNorm"),
            pre_norm=False,
        )

    def embeddings(self) -> nn.Module:
        return self.base.embeddings

    def embed(
        self, inputs: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.base.embeddings(
            input_ids=inputs.get("input_ids"),
            token_type_ids=inputs.get("token_type_ids"),
            position_ids=inputs.get("position_ids"),
            inputs_embeds=inputs.get("inputs_embeds"),
        )
        return hidden, inputs.get("attention_mask")
