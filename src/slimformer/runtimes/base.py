"""What every served (non-eager) module shares: the call signature, outputs, saving."""

from __future__ import annotations

import time
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

    runtime: ClassVar[str]
    # Generation with a KV cache needs past-key-value inputs the exported graph lacks.
    supports_kv_cache: ClassVar[bool] = False

    def __init__(self, config: Any, head: str):
        super().__init__()
        self.config = config
        self.head = head
        self.input_names = HEAD_INPUTS[head]

    @property
    def eager(self) -> nn.Module | None:
        """The PyTorch module holding the weights, for runtimes that run it (torch.compile);
        None where the engine owns the weights (they are saved as its files)."""
        return None

    def forward(self, **inputs: Any) -> Any:
        if inputs.get("use_cache") or inputs.get("past_key_values") is not None:
            raise SlimformerError(
                f"the {self.runtime} runtime serves full forward passes only; KV-cached "
                "generation needs the eager or compiled runtime"
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
        """Write the engine's files into `folder`; return what `load_artifacts` needs."""
        raise NotImplementedError

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> Any:
        """Rebuild from `folder`; `module` is the loaded torch module where `eager` is one."""
        raise NotImplementedError

    def artifact_files(self) -> tuple[str, ...]:
        return ()


_SERVED: dict[str, type[ServedModule]] = {}


def register_served(cls: type[ServedModule]) -> type[ServedModule]:
    _SERVED[cls.runtime] = cls
    return cls


def served_module_class(runtime: str) -> type[ServedModule]:
    from slimformer.passes import load_builtin_passes

    load_builtin_passes()  # runtime passes register their served modules
    try:
        return _SERVED[runtime]
    except KeyError:
        raise SlimformerError(
            f"runtime '{runtime}' is unknown to this slimformer; known: {', '.join(_SERVED)}"
        ) from None


def load_served(
    folder: Path, meta: dict[str, Any], config: Any, head: str, module: nn.Module | None = None
) -> ServedModule:
    runtime = meta.get("name", "?")
    missing = [f for f in meta.get("files", ()) if not (folder / f).is_file()]
    if missing:
        raise SlimformerError(
            f"{folder} lacks {', '.join(missing)} (the {runtime} model); the saved model is "
            "damaged — save it again"
        )
    return served_module_class(runtime).load_artifacts(folder, meta, config, head, module)


# Float graphs must reproduce eager outputs to this (relative to the output's scale); a larger
# gap means an export or fusion went wrong, and the candidate is refused.
FLOAT_TOLERANCE = 1e-3


class EagerReference:
    """Eager outputs on one small real batch, to trace with and to check a served model by."""

    def __init__(self, model: Any, calibration: Any, rows: int = 2):
        if not calibration:
            raise SlimformerError(
                "a runtime pass needs calibration data to trace and check the model"
            )
        self.head = model.head
        self.inputs = {n: calibration[0][n][:rows] for n in HEAD_INPUTS[model.head]}
        self.output = self.main_output(model)

    def main_output(self, model: Any) -> torch.Tensor:
        with torch.inference_mode():
            return getattr(model(**self.inputs), HEAD_OUTPUT[self.head])

    def difference(self, served: Any, runtime: str, exact: bool, hint: str = "") -> float:
        """Largest absolute difference over real (unpadded) positions; for a float graph
        (`exact`), refuse one beyond FLOAT_TOLERANCE."""
        gap = (self.main_output(served).float() - self.output.float()).abs()
        mask = self.inputs.get("attention_mask")
        if mask is not None and gap.dim() == 3:
            gap = gap[mask.bool()]
        difference = float(gap.max())
        scale = max(1.0, float(self.output.abs().max()))
        if exact and not difference <= FLOAT_TOLERANCE * scale:
            raise SlimformerError(
                f"{runtime}: outputs differ from PyTorch's by {difference:.3g}; refusing the "
                f"model{hint}"
            )
        return difference


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 2)
