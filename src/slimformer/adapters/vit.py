"""Hugging Face ViT image encoders and classifiers."""

import torch
from torch import nn

from slimformer.adapters.base import BlockLayout, EncoderBlock, ModelAdapter
from slimformer.adapters.registry import register_adapter


@register_adapter
class ViTAdapter(ModelAdapter):
    family = "vit"
    model_types = frozenset({"vit"})
    # transformers 5 keeps ViT blocks at `layers`; 4.x had `encoder.layer`.
    onnx_optimizer_type = "vit"
    fixed_token_count = True
    block_paths = ("layers", "encoder.layer")
    layout = BlockLayout(
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        attention_out="attention.o_proj",
        ffn_in=("mlp.fc1",),
        ffn_out="mlp.fc2",
    )

    def encoder_block(self, block_index: int) -> EncoderBlock:
        block = self.blocks()[block_index]
        attention = self.attention_linears(block_index)
        return EncoderBlock(
            query=attention["query"],
            key=attention["key"],
            value=attention["value"],
            attention_out=attention["out"],
            attention_norm=block.layernorm_before,
            ffn_in=block.get_submodule(self.layout.ffn_in[0]),
            activation=block.get_submodule("mlp.activation_fn"),
            ffn_out=block.get_submodule(self.layout.ffn_out),
            ffn_norm=block.layernorm_after,
            pre_norm=True,
        )

    def tokens_per_example(self) -> int:
        config = self.model.config
        return (int(config.image_size) // int(config.patch_size)) ** 2 + 1  # + the class token

    def patch_grid(self, inputs: dict[str, torch.Tensor | None]) -> tuple[int, int]:
        height, width = inputs["pixel_values"].shape[-2:]
        patch = int(self.model.config.patch_size)
        return int(height) // patch, int(width) // patch

    def embeddings(self) -> nn.Module:
        return self.base.embeddings

    def embed(
        self, inputs: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = inputs["pixel_values"]
        patches = self.base.embeddings.patch_embeddings.projection
        hidden = self.base.embeddings(
            pixels.to(patches.weight.dtype),
            bool_masked_pos=inputs.get("bool_masked_pos"),
            interpolate_pos_encoding=bool(inputs.get("interpolate_pos_encoding")),
        )
        return hidden, None  # every patch is a real token

    def final_norm(self) -> nn.Module | None:
        return self.base.layernorm
