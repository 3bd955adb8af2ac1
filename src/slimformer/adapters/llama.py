"""Llama-family decoders: Llama, SmolLM2 (a Llama), Mistral, Qwen2/3 (same block layout)."""

from torch import nn

from slimformer.adapters.base import BlockLayout, ModelAdapter
from slimformer.adapters.registry import register_adapter


@register_adapter
class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = frozenset({"llama", "mistral", "qwen2", "qwen3"})
    block_paths = ("layers",)
    layout = BlockLayout(
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attention_out="self_attn.o_proj",
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
    )

    def fold_uniform_heads(self) -> None:
        head_dim = self.head_dim()  # before the head count changes
        layers = [self.attention_linears(i) for i in range(self.num_layers)]
        heads = {a["query"].out_features // head_dim for a in layers}
        groups = {a["key"].out_features // head_dim for a in layers}
        if len(heads) == 1 and len(groups) == 1:
            config = self.model.config
            config.head_dim = head_dim
            config.num_attention_heads = heads.pop()
            config.num_key_value_heads = groups.pop()

    def embeddings(self) -> nn.Module:
        return self.base.embed_tokens

    def block_norms(self, block_index: int) -> dict[str, nn.Module]:
        block = self.blocks()[block_index]
        return {"attention": block.input_layernorm, "ffn": block.post_attention_layernorm}

    def final_norm(self) -> nn.Module:
        return self.base.norm

    def output_head(self) -> nn.Module:
        return self.model.get_output_embeddings()
