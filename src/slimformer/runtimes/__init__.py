"""Runtimes: where a model is served. Eager PyTorch is the default (no pass); the others are
stage-50 passes that swap the model's module for a `ServedModule` with the same call signature
(`model(input_ids=..., attention_mask=...)` returns an object with `.last_hidden_state` or
`.logits`), so tasks and measurement run every runtime the same way."""

from slimformer.runtimes.base import ServedModule, load_served, served_module_class

__all__ = ["ServedModule", "load_served", "served_module_class"]
