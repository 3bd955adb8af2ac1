"""Model adapters, one file per family; importing this package registers them all."""

from slimformer.adapters import bert, llama, vit  # noqa: F401  (registration side effect)
from slimformer.adapters.base import BlockLayout, EncoderBlock, ModelAdapter, ModelFacts
from slimformer.adapters.registry import adapter_class_for, adapter_for, supported_model_types

__all__ = [
    "BlockLayout",
    "EncoderBlock",
    "ModelAdapter",
    "ModelFacts",
    "adapter_class_for",
    "adapter_for",
    "supported_model_types",
]
