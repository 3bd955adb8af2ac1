"""Export a (possibly pruned) model to ONNX for ONNX Runtime and OpenVINO.

The TorchScript-based exporter (`dynamo=False`) is used on purpose: on its graph ONNX Runtime's
transformer optimizer fuses Attention, EmbedLayerNormalization and SkipLayerNormalization; on the
dynamo exporter's graph it fused no Attention (measured, see DESIGN.md). Attention is switched
to the eager implementation for the trace, the pattern those fusions match.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from slimformer.checkpoint import codec_for
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.runtimes.base import HEAD_INPUTS, HEAD_OUTPUT

OPSET = 17
_NO_ONNX_FORM = (
    "cannot export layers quantized by a PyTorch pass (their int8/int4 kernels have no ONNX "
    "form); quantize inside the runtime instead (its int8 setting)"
)
# Passes whose output cannot be exported, for the runtime passes' `conflicts`.
EXPORT_CONFLICTS = {
    "quantize.dynamic_int8": _NO_ONNX_FORM,
    "quantize.static_int8": _NO_ONNX_FORM,
    "quantize.weight_only": _NO_ONNX_FORM,
    "runtime.batching:mode=unpadded": "unpadded batching runs in PyTorch only; use "
    "runtime.batching mode=bucketed with an exported model",
}


class _PositionalCall(nn.Module):
    """The exporter passes inputs by position; the Hugging Face module wants keywords."""

    def __init__(self, module: nn.Module, input_names: tuple[str, ...], output: str):
        super().__init__()
        self.module, self.input_names, self.output = module, input_names, output

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        if "input_ids" in kwargs:
            kwargs["use_cache"] = False
        return getattr(self.module(**kwargs, return_dict=True), self.output)


def unexportable_layers(model: SlimModel) -> dict[str, str]:
    """Modules with no ONNX form (torch int8/int4 kernels), by kind: name of the first one."""
    found: dict[str, str] = {}
    for name, module in model.module.named_modules():
        codec = codec_for(module)
        if codec is not None and codec.kind not in found:
            found[codec.kind] = name
    return found


def check_exportable(model: SlimModel, runtime: str) -> None:
    blocked = unexportable_layers(model)
    if blocked:
        kinds = ", ".join(f"{kind} (e.g. {name})" for kind, name in blocked.items())
        raise SlimformerError(
            f"{runtime}: cannot export layers quantized by a PyTorch pass: {kinds} have no ONNX "
            f"form; quantize inside the runtime instead ({runtime} int8 setting)"
        )
    check_not_served(model, runtime)


def check_not_served(model: SlimModel, runtime: str) -> None:
    served = getattr(model.module, "runtime", None)
    if served == "unpadded":  # a saved unpadded model, loaded and given to a runtime
        raise SlimformerError(f"{runtime}: {EXPORT_CONFLICTS['runtime.batching:mode=unpadded']}")
    if served:
        raise SlimformerError(f"{runtime}: the model already runs in {served}")


def export_onnx(model: SlimModel, example: dict[str, torch.Tensor], path: Path) -> None:
    """Write `path` (ONNX, dynamic batch and sequence axes) for `model.head`'s inputs."""
    names = HEAD_INPUTS[model.head]
    traced = copy.deepcopy(model.module).eval()  # the trace must not touch the live model
    if hasattr(traced, "set_attn_implementation"):
        # Families without an eager switch keep their attention as it is.
        with contextlib.suppress(ValueError, AttributeError):
            traced.set_attn_implementation("eager")
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names if n != "pixel_values"}
    dynamic["pixel_values"] = {0: "batch"}
    axes = {n: dynamic[n] for n in names}
    axes["output"] = (
        {0: "batch", 1: "sequence"} if model.head != "image-classification" else {0: "batch"}
    )
    wrapper = _PositionalCall(traced, names, HEAD_OUTPUT[model.head])
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(example[n] for n in names),
                str(path),
                input_names=list(names),
                output_names=["output"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as error:  # the exporter raises many types; the study records the reason
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise SlimformerError(f"ONNX export failed: {type(error).__name__}: {first}") from None
