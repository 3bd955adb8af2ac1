"""Hugging Face ViT image encoders and classifiers."""

from slimformer.adapters.base import BlockLayout, ModelAdapter
from slimformer.adapters.registry import register_adapter


@register_adapter
class ViTAdapter(ModelAdapter):
    family = "vit"
    model_types = frozenset({"vit"})
    # transformers 5 keeps ViT blocks at `layers`; 4.x had `encoder.layer`.
    onnx_optimizer_type = "vit"
    block_paths = ("layers", "encoder.layer")
    layout = BlockLayout(
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        attention_out="attention.o_proj",
        ffn_in=("mlp.fc1",),
        ffn_out="mlp.fc2",
    )
