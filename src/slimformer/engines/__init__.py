"""Engines: where a model is served. Eager PyTorch is the default (no engine); the others are
`ServedModule`s with the Hugging Face module's call signature (`model(input_ids=...,
attention_mask=...)` returns an object with `.last_hidden_state` or `.logits`), so tasks and
measurement run every engine the same way.

The runtime *passes* (`slimformer.passes.runtime_*`) build these modules; loading a saved model
rebuilds them from here alone. Each engine module registers its served module when imported,
and every one is imported below, so `load_served` knows them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimformer.engines import compiled, llamacpp, onnxruntime, openvino, unpadded  # noqa: F401
from slimformer.engines.base import ServedModule, register_served, registered_served
from slimformer.errors import SlimformerError


def served_module_class(runtime: str) -> type[ServedModule]:
    served = registered_served()
    try:
        return served[runtime]
    except KeyError:
        raise SlimformerError(
            f"runtime '{runtime}' is unknown to this slimformer; known: {', '.join(served)}"
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


__all__ = ["ServedModule", "load_served", "register_served", "served_module_class"]
