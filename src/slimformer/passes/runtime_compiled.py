"""`runtime.compiled`: the PyTorch model under torch.compile (inductor, CPU C++ kernels), served
by `engines.compiled` (which says how it is saved and compiled again after loading)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimformer.engines.compiled import CompiledModule
from slimformer.engines.export import check_not_served
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, Phase, register_pass, searchable
from slimformer.passes.serving import EagerReference, Stopwatch


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
    phase = Phase.RUNTIME
    group = "runtime"
    terminal = True
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
