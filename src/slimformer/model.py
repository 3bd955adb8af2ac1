"""The model slimformer works on: a Hugging Face module plus what we know about it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimformer.adapters import ModelAdapter, adapter_for
from slimformer.recipe import Recipe

# Which transformers auto class builds each head.
HEADS = {
    "embedding": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}


def head_from_architectures(architectures: list[str] | None) -> str:
    name = (architectures or [""])[0]
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if name.endswith("ForImageClassification"):
        return "image-classification"
    return "embedding"


@dataclass
class SlimModel:
    """A loaded model: call it like the Hugging Face module it wraps.

    `source` is the original checkpoint this model was derived from; quality is measured
    against it. `recipe` holds the passes applied so far.
    """

    module: nn.Module
    head: str
    tokenizer: Any = None
    source: str = ""
    recipe: Recipe = field(default_factory=Recipe)
    # How batches of variable-length inputs are formed (see passes/runtime_batching.py).
    batching: str = "bucketed"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.module)

    @property
    def config(self) -> Any:
        return self.module.config

    def copy(self) -> SlimModel:
        return SlimModel(
            module=copy.deepcopy(self.module),
            head=self.head,
            tokenizer=self.tokenizer,
            source=self.source,
            recipe=self.recipe,
            batching=self.batching,
        )
