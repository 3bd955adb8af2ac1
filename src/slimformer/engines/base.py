"""What every served (non-eager) module shares: the call signature, outputs, saving, and the
registry that rebuilds a saved one by its runtime name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput

from slimformer.errors import SlimformerError

# The inputs each head's exported graph takes, in order, and its one output.
HEAD_INPUTS = {
    "embedding": ("input_ids", "attention_mask"),
    "sequence-classification": ("input_ids", "attention_mask"),
    "causal-lm": ("input_ids", "attention_mask"),
    "image-classification": ("pixel_values",),
}
HEAD_OUTPUT = {
    "embedding": "last_hidden_state",
    "sequence-classification": "logits",
    "causal-lm": "logits",
    "image-classification": "logits",
}


def wrap_output(head: str, tensor: torch.Tensor) -> Any:
    """The Hugging Face output object the eager model would have returned."""
    if head == "embedding":
        return BaseModelOutput(last_hidden_state=tensor)
    if head == "causal-lm":
        return CausalLMOutput(logits=tensor)
    return SequenceClassifierOutput(logits=tensor)


class ServedModule(nn.Module):
    """A model served by another engine, called like the Hugging Face module it replaced.

    Subclasses set `runtime`, implement `run` and the two artifact methods. They keep no torch
    weights (the engine owns them), so memory measured for them is the engine's.
    """

    # The name saved in slimformer.json and looked up in the registry at load.
    runtime: ClassVar[str]
    # What measurements report as the runtime: the engine that does the math. A module that
    # only rearranges PyTorch's eager computation (padding-free batching) says "eager".
    engine: ClassVar[str | None] = None  # None: the runtime's name
    # Generation with a KV cache needs past-key-value inputs the exported graph lacks.
    supports_kv_cache: ClassVar[bool] = False

    def __init__(self, config: Any, head: str):
        super().__init__()
        self.config = config
        self.head = head
        self.input_names = HEAD_INPUTS[head]

    @classmethod
    def reported_engine(cls) -> str:
        return cls.engine or cls.runtime

    @property
    def eager(self) -> nn.Module | None:
        """The PyTorch module holding the weights, for runtimes that run it (torch.compile);
        None where the engine owns the weights (they are saved as its files)."""
        return None

    def export_refusal(self) -> str:
        """Why this model cannot be handed to another runtime (exported or compiled)."""
        return f"the model already runs in {self.runtime}"

    def forward(self, **inputs: Any) -> Any:
        if inputs.get("use_cache") or inputs.get("past_key_values") is not None:
            raise SlimformerError(
                f"the {self.runtime} runtime serves full forward passes only; KV-cached "
                "generation needs the eager or compiled runtime, or runtime.openvino or "
                "runtime.llamacpp for a decoder"
            )
        missing = [n for n in self.input_names if n not in inputs and n != "attention_mask"]
        if missing:
            raise SlimformerError(f"{self.runtime} model needs input(s) {', '.join(missing)}")
        given = dict(inputs)
        if "attention_mask" in self.input_names and given.get("attention_mask") is None:
            given["attention_mask"] = torch.ones_like(given["input_ids"])
        arrays = {n: given[n].detach().cpu().contiguous() for n in self.input_names}
        return wrap_output(self.head, self.run(arrays))

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def save_artifacts(self, folder: Path) -> dict[str, Any]:
        """Write the engine's files into `folder`; return what `load_artifacts` needs, with
        the written files' names under "files" (the folder's size on disk counts them)."""
        raise NotImplementedError

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> Any:
        """Rebuild from `folder`; `module` is the loaded torch module where `eager` is one."""
        raise NotImplementedError


_SERVED: dict[str, type[ServedModule]] = {}


def register_served(cls: type[ServedModule]) -> type[ServedModule]:
    if cls.runtime in _SERVED:
        raise ValueError(f"served module for runtime {cls.runtime} registered twice")
    _SERVED[cls.runtime] = cls
    return cls


def registered_served() -> dict[str, type[ServedModule]]:
    """runtime name -> served module class (complete once `slimformer.engines` is imported)."""
    return dict(_SERVED)
