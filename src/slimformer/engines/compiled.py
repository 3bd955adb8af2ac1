"""A PyTorch model served under torch.compile (inductor, CPU C++ kernels).

The weights stay torch's and are saved as for eager; the compile happens on the first call
after loading (tens of seconds: the measurement's warm-up absorbs it). Shapes are dynamic so
each new sequence length does not recompile.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.engines.base import ServedModule, register_served


@register_served
class CompiledModule(ServedModule):
    runtime = "compiled"
    supports_kv_cache = True

    def __init__(self, module: nn.Module, head: str, freezing: bool):
        super().__init__(module.config, head)
        self.module = module
        self.freezing = freezing
        self._compiled: Any = None

    @property
    def eager(self) -> nn.Module:
        return self.module

    def forward(self, **inputs: Any) -> Any:
        if self._compiled is None:
            # Freezing folds the weights into the graph as constants (needed for fast int8).
            torch._inductor.config.freezing = self.freezing
            self._compiled = torch.compile(self.module, dynamic=True)
        return self._compiled(**inputs)

    def __deepcopy__(self, memo: dict) -> CompiledModule:
        return CompiledModule(copy.deepcopy(self.module, memo), self.head, self.freezing)

    def save_artifacts(self, folder: Path) -> dict[str, Any]:
        return {"freezing": self.freezing}

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> CompiledModule:
        return cls(module, head, bool(meta.get("freezing", True)))
