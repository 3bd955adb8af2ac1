"""What the runtime passes share: checking a served model against eager outputs, timing the
conversion, and the passes an export cannot follow."""

from __future__ import annotations

import time
from typing import Any

import torch

from slimformer.engines.base import HEAD_INPUTS, HEAD_OUTPUT
from slimformer.engines.unpadded import EXPORT_REFUSAL as UNPADDED_EXPORT_REFUSAL
from slimformer.errors import SlimformerError
from slimformer.tokens import TEXT_EXPORT_REFUSAL, TEXT_UNEXPORTABLE_MODES

_NO_ONNX_FORM = (
    "cannot export layers quantized by a PyTorch pass (their int8/int4 kernels have no ONNX "
    "form); quantize inside the runtime instead (its int8 setting)"
)
# Passes whose output cannot be exported, for the exporting runtime passes' `conflicts`.
EXPORT_CONFLICTS = {
    "quantize.dynamic_int8": _NO_ONNX_FORM,
    "quantize.static_int8": _NO_ONNX_FORM,
    "quantize.weight_only": _NO_ONNX_FORM,
    "runtime.batching:mode=unpadded": UNPADDED_EXPORT_REFUSAL,
}


def export_conflicts_for(facts: Any) -> dict[str, str]:
    """EXPORT_CONFLICTS, and merging or pruning tokens on text (their token counts vary with
    the input's length; a traced graph would fix them): the exporting runtimes'
    `conflicts_for`."""
    if facts is None or getattr(facts, "fixed_token_count", True):
        return EXPORT_CONFLICTS
    return EXPORT_CONFLICTS | {
        f"reduce.tokens:mode={mode}": TEXT_EXPORT_REFUSAL for mode in TEXT_UNEXPORTABLE_MODES
    }


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
