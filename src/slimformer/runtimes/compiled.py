"""`runtime.compiled`: the PyTorch model under torch.compile (inductor, CPU C++ kernels).

The weights stay torch's and are saved as for eager; the compile happens on the first call
after loading (tens of seconds: the measurement's warm-up absorbs it). Shapes are dynamic so
each new sequence length does not recompile.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, register_pass, searchable
from slimformer.runtimes.base import EagerReference, ServedModule, Stopwatch, register_served
from slimformer.runtimes.export import check_not_served


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


@dataclass(frozen=True)
class CompiledConfig:
    freezing: bool = searchable(
        True, Choice((True, False)), "fold weights into the compiled graph as constants"
    )


@register_pass
class CompiledPass(Pass):
    name = "runtime.compiled"
    summary = "serve under torch.compile (inductor C++ kernels on CPU)"
    config_class = CompiledConfig
    stage = 50
    group = "runtime"
    # A compile takes a minute or more per candidate on 2 cores (and again when the
    # candidate is measured): searched only when named in --passes.
    searched_by_default = False
    needs_calibration = True  # one real batch to compile and check against eager

    def apply(self, model: SlimModel, config: CompiledConfig, ctx: PassContext) -> dict[str, Any]:
        check_not_served(model, self.name)
        watch = Stopwatch()
        reference = EagerReference(model, ctx.calibration)
        served = CompiledModule(model.module, model.head, config.freezing)
        # Not refused on a gap: inductor may reorder float math (recorded, not judged).
        difference = reference.difference(served, self.name, exact=False)
        model.module = served
        return {"max_abs_difference": round(difference, 6), "compile_seconds": watch.seconds()}
