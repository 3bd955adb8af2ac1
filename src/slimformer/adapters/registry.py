"""Which adapter serves which `config.model_type`."""

from __future__ import annotations

from torch import nn

from slimformer.adapters.base import ModelAdapter
from slimformer.errors import SlimformerError

_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS.append(cls)
    return cls


def supported_model_types() -> list[str]:
    return sorted(t for cls in _ADAPTERS for t in cls.model_types)


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    for cls in _ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise SlimformerError(
        f"unsupported architecture '{model_type}': slimformer supports "
        f"{', '.join(supported_model_types())}"
    )


def adapter_for(model: nn.Module) -> ModelAdapter:
    return adapter_class_for(model.config.model_type)(model)
